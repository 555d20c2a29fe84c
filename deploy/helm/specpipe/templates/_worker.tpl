{{/*
Worker objects, shared by the draft-* and target-* templates. Each takes (dict "root" $ "role" "draft").
*/}}

{{/* The direct-stream port of a role's workers: target.directStreamPort, 0 for drafts or when off. */}}
{{- define "specpipe.directStreamPort" -}}
{{- if eq .role "target" }}{{ int (default 0 .root.Values.target.directStreamPort) }}{{ else }}0{{ end }}
{{- end }}

{{/* One Deployment per pool of the role. */}}
{{- define "specpipe.workerDeployments" -}}
{{- $root := .root }}
{{- $role := .role }}
{{- $component := index $root.Values $role }}
{{- $port := int $component.port }}
{{- $directPort := include "specpipe.directStreamPort" (dict "root" $root "role" $role) | int }}
{{- $metrics := default dict $component.metrics }}
{{- range $pool := (include "specpipe.pools" (dict "root" $root "role" $role) | fromYaml).pools }}
{{- $ctx := dict "root" $root "role" $role "pool" $pool.name }}
{{- $name := include "specpipe.poolName" $ctx }}
{{- $model := $pool.model }}
{{- $images := list $pool.componentImage $pool.image }}
{{- $gpus := int $pool.gpus }}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "specpipe.poolLabels" $ctx | nindent 4 }}
spec:
  replicas: {{ int $pool.replicas }}
  revisionHistoryLimit: 5
  {{- with $pool.strategy }}
  strategy:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "specpipe.poolSelectorLabels" $ctx | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "specpipe.poolLabels" $ctx | nindent 8 }}
        {{- with $pool.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- $annotations := dict }}
      {{- if $metrics.enabled }}
      {{- $_ := set $annotations "prometheus.io/scrape" "true" }}
      {{- $_ := set $annotations "prometheus.io/port" (toString (int $metrics.port)) }}
      {{- $_ := set $annotations "prometheus.io/path" "/metrics" }}
      {{- end }}
      {{- range $key, $value := $pool.podAnnotations }}
      {{- $_ := set $annotations $key $value }}
      {{- end }}
      {{- with $annotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      # Workers never call the Kubernetes API.
      automountServiceAccountToken: false
      enableServiceLinks: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $pool.runtimeClassName }}
      runtimeClassName: {{ . }}
      {{- end }}
      {{- with $pool.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      terminationGracePeriodSeconds: {{ int $pool.terminationGracePeriodSeconds }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      {{- with $pool.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $pool.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $pool.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $pool.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if $model.download }}
      {{- $download := $model.download }}
      initContainers:
        # Fetches the model into the pod's /models emptyDir (needs network access to the hub); the server
        # container then runs offline.
        - name: download-model
          image: {{ include "specpipe.image" (dict "root" $root "images" $images "device" $pool.device) }}
          imagePullPolicy: {{ include "specpipe.imagePullPolicy" (dict "root" $root "images" $images) }}
          command:
            - python
            - -c
            - |
              import json, os
              from huggingface_hub import snapshot_download
              patterns = json.loads(os.environ.get("SPECPIPE_MODEL_ALLOW_PATTERNS") or "null")
              path = snapshot_download(
                  repo_id=os.environ["SPECPIPE_MODEL_REPO"],
                  revision=os.environ.get("SPECPIPE_MODEL_REVISION") or None,
                  local_dir=os.environ["SPECPIPE_MODEL_DIR"],
                  allow_patterns=patterns,
              )
              print("downloaded", os.environ["SPECPIPE_MODEL_REPO"], "to", path, flush=True)
          env:
            {{- include "specpipe.cacheEnv" $root | nindent 12 }}
            # The image defaults to offline; this container is the one that goes online.
            - name: HF_HUB_OFFLINE
              value: "0"
            - name: TRANSFORMERS_OFFLINE
              value: "0"
            - name: SPECPIPE_MODEL_REPO
              value: {{ required (printf "%s pool %s: model.download.repo is required" $role $pool.name) $download.repo | quote }}
            - name: SPECPIPE_MODEL_REVISION
              value: {{ default "" $download.revision | quote }}
            - name: SPECPIPE_MODEL_DIR
              value: {{ include "specpipe.modelPath" $pool | quote }}
            - name: SPECPIPE_MODEL_ALLOW_PATTERNS
              value: {{ toJson (default list $download.allowPatterns) | quote }}
            {{- with $download.endpoint }}
            - name: HF_ENDPOINT
              value: {{ . | quote }}
            {{- end }}
            {{- with $download.tokenSecret }}
            {{- if .name }}
            - name: HF_TOKEN
              valueFrom:
                secretKeyRef:
                  name: {{ .name }}
                  key: {{ .key | default "token" }}
            {{- end }}
            {{- end }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          resources:
            {{- toYaml (default dict $download.resources) | nindent 12 }}
          volumeMounts:
            - name: models
              mountPath: /models
            - name: tmp
              mountPath: /tmp
      {{- end }}
      containers:
        - name: {{ $role }}
          image: {{ include "specpipe.image" (dict "root" $root "images" $images "device" $pool.device) }}
          imagePullPolicy: {{ include "specpipe.imagePullPolicy" (dict "root" $root "images" $images) }}
          args:
            - serve
            - {{ $role }}
            - --host=0.0.0.0
            - --port={{ $port }}
            - --model={{ include "specpipe.modelPath" $pool }}
            - --device={{ $pool.device }}
            - --dtype={{ $pool.dtype }}
            {{- if gt (int $pool.threads) 0 }}
            - --threads={{ int $pool.threads }}
            {{- else }}
            # The container's CPU request in whole cores (the downward API rounds up; 0 without a request:
            # torch's default). torch's own default is the node's core count, whatever the pod may use.
            - --threads=$(SPECPIPE_CPU_REQUEST)
            {{- end }}
            - --max-context={{ int $pool.maxContext }}
            - --max-cached-sessions={{ int $pool.maxCachedSessions }}
            - --kv-cache-budget-mb={{ toString $pool.kvCacheBudgetMb }}
            - --max-speculative-tokens={{ int $root.Values.coordinator.maxSpeculativeTokens }}
            - --log-level={{ $pool.logLevel }}
            {{- if gt $directPort 0 }}
            - --direct-stream-port={{ $directPort }}
            {{- end }}
            {{- if gt (int $pool.maxBatchSessions) 1 }}
            - --max-batch-sessions={{ int $pool.maxBatchSessions }}
            {{- end }}
            {{- if gt (int $pool.staticKvSlots) 0 }}
            - --static-kv-slots={{ int $pool.staticKvSlots }}
            {{- end }}
            {{- if $metrics.enabled }}
            - --metrics-port={{ int $metrics.port }}
            {{- end }}
            {{- range $pool.extraArgs }}
            - {{ . | quote }}
            {{- end }}
          env:
            {{- include "specpipe.cacheEnv" $root | nindent 12 }}
            - name: SPECPIPE_CPU_REQUEST
              valueFrom:
                resourceFieldRef:
                  resource: requests.cpu
                  divisor: "1"
            # The model is local (image, volume or the init download): never reach for the hub.
            - name: HF_HUB_OFFLINE
              value: "1"
            - name: TRANSFORMERS_OFFLINE
              value: "1"
            {{- with $pool.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          ports:
            - name: grpc
              containerPort: {{ $port }}
              protocol: TCP
            {{- if gt $directPort 0 }}
            - name: direct
              containerPort: {{ $directPort }}
              protocol: TCP
            {{- end }}
            {{- if $metrics.enabled }}
            - name: metrics
              containerPort: {{ int $metrics.port }}
              protocol: TCP
            {{- end }}
          startupProbe:
            {{- include "specpipe.grpcProbe" (dict "port" $port "probe" $pool.startupProbe) | nindent 12 }}
          livenessProbe:
            {{- include "specpipe.grpcProbe" (dict "port" $port "probe" $pool.livenessProbe) | nindent 12 }}
          readinessProbe:
            {{- include "specpipe.grpcProbe" (dict "port" $port "probe" $pool.readinessProbe) | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          resources:
            {{- $resources := deepCopy (default dict $pool.resources) }}
            {{- $requests := default dict $resources.requests }}
            {{- $limits := default dict $resources.limits }}
            {{- $_ := unset $requests "nvidia.com/gpu" }}
            {{- $_ := unset $limits "nvidia.com/gpu" }}
            {{- if gt $gpus 0 }}
            {{- $_ := set $requests "nvidia.com/gpu" $gpus }}
            {{- $_ := set $limits "nvidia.com/gpu" $gpus }}
            {{- end }}
            {{- if $requests }}{{ $_ := set $resources "requests" $requests }}{{ else }}{{ $_ := unset $resources "requests" }}{{ end }}
            {{- if $limits }}{{ $_ := set $resources "limits" $limits }}{{ else }}{{ $_ := unset $resources "limits" }}{{ end }}
            {{- toYaml $resources | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            {{- if or $model.pvc $model.hostPath $model.download }}
            - name: models
              mountPath: /models
              readOnly: true
              {{- if and $model.pvc $model.pvc.subPath }}
              subPath: {{ $model.pvc.subPath }}
              {{- end }}
            {{- end }}
            {{- if $pool.shmSizeLimit }}
            - name: shm
              mountPath: /dev/shm
            {{- end }}
      volumes:
        - name: tmp
          emptyDir:
            {{- with $pool.tmpSizeLimit }}
            sizeLimit: {{ . }}
            {{- end }}
        {{- if $model.pvc }}
        - name: models
          persistentVolumeClaim:
            claimName: {{ required (printf "%s pool %s: model.pvc.claimName is required" $role $pool.name) $model.pvc.claimName }}
            readOnly: true
        {{- else if $model.hostPath }}
        - name: models
          hostPath:
            path: {{ required (printf "%s pool %s: model.hostPath.path is required" $role $pool.name) $model.hostPath.path }}
            type: {{ default "Directory" $model.hostPath.type }}
        {{- else if $model.download }}
        - name: models
          emptyDir:
            {{- with $model.download.sizeLimit }}
            sizeLimit: {{ . }}
            {{- end }}
        {{- end }}
        {{- if $pool.shmSizeLimit }}
        - name: shm
          emptyDir:
            medium: Memory
            sizeLimit: {{ $pool.shmSizeLimit }}
        {{- end }}
{{- end }}
{{- end }}

{{/* One headless Service per pool: its EndpointSlices (kubernetes discovery) or DNS name (dns). */}}
{{- define "specpipe.workerServices" -}}
{{- $root := .root }}
{{- $role := .role }}
{{- $component := index $root.Values $role }}
{{- range $pool := (include "specpipe.pools" (dict "root" $root "role" $role) | fromYaml).pools }}
{{- $ctx := dict "root" $root "role" $role "pool" $pool.name }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ include "specpipe.poolName" $ctx }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "specpipe.poolLabels" $ctx | nindent 4 }}
spec:
  type: ClusterIP
  clusterIP: None
  # Only replicas whose model is loaded (readiness = grpc.health.v1 SERVING) are published.
  publishNotReadyAddresses: false
  selector:
    {{- include "specpipe.poolSelectorLabels" $ctx | nindent 4 }}
  ports:
    - name: grpc
      port: {{ int $component.port }}
      targetPort: grpc
      protocol: TCP
{{- end }}
{{- end }}

{{/* One PodDisruptionBudget per pool (when enabled and the pool has replicas). */}}
{{- define "specpipe.workerPodDisruptionBudgets" -}}
{{- $root := .root }}
{{- $role := .role }}
{{- range $pool := (include "specpipe.pools" (dict "root" $root "role" $role) | fromYaml).pools }}
{{- $ctx := dict "root" $root "role" $role "pool" $pool.name }}
{{- $pdb := default dict $pool.podDisruptionBudget }}
{{- if and $pdb.enabled (gt (int $pool.replicas) 0) }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "specpipe.poolName" $ctx }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "specpipe.poolLabels" $ctx | nindent 4 }}
spec:
  {{- if hasKey $pdb "minAvailable" }}
  minAvailable: {{ $pdb.minAvailable }}
  {{- else if hasKey $pdb "maxUnavailable" }}
  maxUnavailable: {{ $pdb.maxUnavailable }}
  {{- else }}
  maxUnavailable: 1
  {{- end }}
  selector:
    matchLabels:
      {{- include "specpipe.poolSelectorLabels" $ctx | nindent 6 }}
{{- end }}
{{- end }}
{{- end }}
