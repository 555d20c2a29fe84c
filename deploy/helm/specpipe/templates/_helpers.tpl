{{/*
The chart name ("specpipe" unless nameOverride): the app.kubernetes.io/name label the coordinator's
Kubernetes discovery selects on.
*/}}
{{- define "specpipe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's full name, the prefix of every object name. Capped at 34 characters so that
"<fullname>-target-<pool>" (pool names are at most 20) stays a valid 63-character DNS label.
*/}}
{{- define "specpipe.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 34 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 34 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 34 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "specpipe.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "specpipe.labels" -}}
helm.sh/chart: {{ include "specpipe.chart" . }}
app.kubernetes.io/part-of: specpipe
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The release's selector labels: name and instance. */}}
{{- define "specpipe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "specpipe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector labels of one component. Call with (dict "root" $ "component" "coordinator"). */}}
{{- define "specpipe.componentSelectorLabels" -}}
{{ include "specpipe.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels of one component's objects. */}}
{{- define "specpipe.componentLabels" -}}
{{ include "specpipe.componentSelectorLabels" . }}
{{ include "specpipe.labels" .root }}
{{- end }}

{{/* Selector labels of one worker pool. Call with (dict "root" $ "role" "target" "pool" "h100"). */}}
{{- define "specpipe.poolSelectorLabels" -}}
{{ include "specpipe.componentSelectorLabels" (dict "root" .root "component" .role) }}
specpipe.io/pool: {{ .pool }}
{{- end }}

{{- define "specpipe.poolLabels" -}}
{{ include "specpipe.poolSelectorLabels" . }}
{{ include "specpipe.labels" .root }}
{{- end }}

{{/* Name of one pool's Deployment, headless Service and PodDisruptionBudget. */}}
{{- define "specpipe.poolName" -}}
{{- printf "%s-%s-%s" (include "specpipe.fullname" .root) .role .pool | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "specpipe.coordinatorName" -}}
{{- printf "%s-coordinator" (include "specpipe.fullname" .) }}
{{- end }}

{{- define "specpipe.redisName" -}}
{{- printf "%s-redis" (include "specpipe.fullname" .) }}
{{- end }}

{{- define "specpipe.coordinatorServiceAccountName" -}}
{{- if .Values.coordinator.serviceAccount.create }}
{{- default (include "specpipe.coordinatorName" .) .Values.coordinator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.coordinator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image reference. Call with (dict "root" $ "images" (list componentImage poolImage) "device" "cuda").
Later maps override earlier ones key by key over the shared `image`. The tag is the first explicitly set
one (pool, then component, then shared), else the chart's appVersion; cudaTagSuffix is appended for a cuda
device unless the component or pool named its own tag.
*/}}
{{- define "specpipe.image" -}}
{{- $root := .root }}
{{- $image := deepCopy $root.Values.image }}
{{- $ownTag := "" }}
{{- range .images }}
{{- if . }}
{{- $image = mergeOverwrite $image (deepCopy .) }}
{{- if .tag }}{{ $ownTag = toString .tag }}{{ end }}
{{- end }}
{{- end }}
{{- $tag := default $root.Chart.AppVersion (toString (default "" $image.tag)) }}
{{- if and (not $ownTag) (hasPrefix "cuda" (toString (default "" .device))) }}
{{- $tag = printf "%s%s" $tag (toString (default "" $root.Values.image.cudaTagSuffix)) }}
{{- end }}
{{- printf "%s:%s" $image.repository $tag }}
{{- end }}

{{- define "specpipe.imagePullPolicy" -}}
{{- $policy := .root.Values.image.pullPolicy }}
{{- range .images }}{{ if and . .pullPolicy }}{{ $policy = .pullPolicy }}{{ end }}{{ end }}
{{- $policy }}
{{- end }}

{{/*
The pools of one worker role with the role's defaults applied, as YAML {pools: [...]}. Call with
(dict "root" $ "role" "target"). A pool's keys replace the role's (shallow), so a pool can set gpus: 0 or
tolerations: [] over a non-empty default; `image` is kept separately as componentImage / image.
*/}}
{{- define "specpipe.pools" -}}
{{- $root := .root }}
{{- $role := .role }}
{{- $component := index $root.Values $role }}
{{- $defaults := omit $component "pools" "port" "directStreamPort" "metrics" "image" }}
{{- $pools := list }}
{{- $seen := dict }}
{{- range $i, $p := $component.pools }}
{{- if not $p.name }}
{{- fail (printf "%s.pools[%d]: a pool needs a name" $role $i) }}
{{- end }}
{{- if hasKey $seen $p.name }}
{{- fail (printf "%s.pools: the pool name %q is used twice" $role $p.name) }}
{{- end }}
{{- $_ := set $seen $p.name true }}
{{- $merged := deepCopy $defaults }}
{{- range $k, $v := $p }}
{{- $_ := set $merged $k $v }}
{{- end }}
{{- $_ := set $merged "componentImage" (default dict $component.image) }}
{{- $_ := set $merged "image" (default dict $p.image) }}
{{- $device := toString $merged.device }}
{{- if and (hasPrefix "cuda" $device) (lt (int $merged.gpus) 1) }}
{{- fail (printf "%s pool %q: device %s needs gpus >= 1 (the pod's nvidia.com/gpu request)" $role $p.name $device) }}
{{- end }}
{{- if and (eq $device "cpu") (gt (int $merged.gpus) 0) }}
{{- fail (printf "%s pool %q: gpus is %v but device is cpu; set device: cuda" $role $p.name $merged.gpus) }}
{{- end }}
{{- if and (gt (int $merged.staticKvSlots) 0) (gt (int $merged.maxBatchSessions) 1) }}
{{- fail (printf "%s pool %q: staticKvSlots runs one session per forward; it needs maxBatchSessions 1" $role $p.name) }}
{{- end }}
{{- $model := $merged.model }}
{{- $sources := 0 }}
{{- range $s := list "pvc" "hostPath" "download" }}{{ if hasKey $model $s }}{{ $sources = add1 $sources }}{{ end }}{{ end }}
{{- if gt $sources 1 }}
{{- fail (printf "%s pool %q: model takes at most one of pvc, hostPath and download" $role $p.name) }}
{{- end }}
{{- if and (not $model.path) (not $model.download) }}
{{- fail (printf "%s pool %q: model needs a path (or a download source)" $role $p.name) }}
{{- end }}
{{- $pools = append $pools $merged }}
{{- end }}
{{- toYaml (dict "pools" $pools) }}
{{- end }}

{{/* The --model argument of a merged pool: model.path, else /models for a download. */}}
{{- define "specpipe.modelPath" -}}
{{- default "/models" .model.path }}
{{- end }}

{{/* Environment shared by the specpipe containers: caches under the writable /tmp. */}}
{{- define "specpipe.cacheEnv" -}}
- name: HOME
  value: /tmp
- name: HF_HOME
  value: /tmp/hf
- name: XDG_CACHE_HOME
  value: /tmp/cache
- name: TORCHINDUCTOR_CACHE_DIR
  value: /tmp/inductor
- name: TRITON_CACHE_DIR
  value: /tmp/triton
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
{{- end }}

{{/* A native gRPC probe. Call with (dict "port" 50051 "probe" .Values.coordinator.livenessProbe). */}}
{{- define "specpipe.grpcProbe" -}}
grpc:
  port: {{ .port }}
{{- toYaml (omit .probe "grpc" "httpGet" "tcpSocket" "exec") | nindent 0 }}
{{- end }}

{{/* Where the coordinator reaches the session store. */}}
{{- define "specpipe.redisUrl" -}}
{{- if eq .Values.redis.mode "external" }}
{{- required "redis.external.url is required when redis.mode is external" .Values.redis.external.url }}
{{- else }}
{{- printf "redis://%s:%v/%v" (include "specpipe.redisName" .) .Values.redis.builtin.port .Values.redis.builtin.database }}
{{- end }}
{{- end }}

{{/* The Secret and key holding the store password, as YAML {name, key}; empty when there is none. */}}
{{- define "specpipe.redisPasswordSecret" -}}
{{- if eq .Values.redis.mode "external" }}
{{- with .Values.redis.external.passwordSecret }}
{{- if .name }}
name: {{ .name }}
key: {{ .key | default "password" }}
{{- end }}
{{- end }}
{{- else if .Values.redis.builtin.auth.enabled }}
{{- if .Values.redis.builtin.auth.existingSecret }}
name: {{ .Values.redis.builtin.auth.existingSecret }}
key: {{ .Values.redis.builtin.auth.existingSecretKey | default "password" }}
{{- else }}
name: {{ include "specpipe.redisName" . }}
key: password
{{- end }}
{{- end }}
{{- end }}

{{/* The coordinator's cluster file (coordinator/cluster_config.py). */}}
{{- define "specpipe.clusterConfig" -}}
{{- $root := . }}
{{- $weights := dict }}
{{- $dns := list }}
{{- range $role := list "target" "draft" }}
{{- $component := index $root.Values $role }}
{{- range (include "specpipe.pools" (dict "root" $root "role" $role) | fromYaml).pools }}
{{- if not (hasKey $weights .name) }}
{{- $_ := set $weights .name (dict "weight" .weight) }}
{{- end }}
{{- $host := printf "%s.%s.svc.%s" (include "specpipe.poolName" (dict "root" $root "role" $role "pool" .name)) $root.Release.Namespace $root.Values.clusterDomain }}
{{- $dns = append $dns (dict "role" $role "pool" .name "host" $host "port" (int $component.port)) }}
{{- end }}
{{- end }}
{{- $discovery := dict "backend" .Values.coordinator.discovery.backend "refresh_interval_s" .Values.coordinator.discovery.refreshIntervalSeconds }}
{{- if eq .Values.coordinator.discovery.backend "dns" }}
{{- $_ := set $discovery "dns" $dns }}
{{- else }}
{{- /* Matches the coordinator's own Service too: discovery ignores slices whose role is not draft/target. */}}
{{- $selector := printf "app.kubernetes.io/name=%s,app.kubernetes.io/instance=%s" (include "specpipe.name" .) .Release.Name }}
{{- $_ := set $discovery "kubernetes" (dict "namespace" .Release.Namespace "label_selector" $selector "role_label" "app.kubernetes.io/component" "pool_label" "specpipe.io/pool" "port_name" "grpc") }}
{{- end }}
{{- $config := dict "pools" $weights "discovery" $discovery }}
{{- $_ := set $config "routing" (dict "imbalance_factor" .Values.coordinator.routing.imbalanceFactor) }}
{{- $_ := set $config "health" (dict "interval_s" .Values.coordinator.health.intervalSeconds "timeout_s" .Values.coordinator.health.timeoutSeconds "failure_threshold" (int (.Values.coordinator.health.failureThreshold | default 2))) }}
{{- toYaml $config }}
{{- end }}
