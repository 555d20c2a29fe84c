"""Where the draft and target replicas are: static lists, DNS of headless Services, the Kubernetes API."""
