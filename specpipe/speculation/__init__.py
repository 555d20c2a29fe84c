"""The speculation schedule shared by every place that runs rounds: k policy, limits, pipelining."""
