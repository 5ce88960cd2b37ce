{{/* Names and labels. */}}
{{- define "pdserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pdserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains (include "pdserve.name" .) .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "pdserve.name" .) | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pdserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pdserve
{{- end -}}

{{/* Selector labels of one component: include "pdserve.selectorLabels" (list $ "decode") */}}
{{- define "pdserve.selectorLabels" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ include "pdserve.name" $ }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "pdserve.componentLabels" -}}
{{ include "pdserve.labels" (index . 0) }}
{{ include "pdserve.selectorLabels" . }}
{{- end -}}

{{- define "pdserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "pdserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "pdserve.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}

{{/* Redis: the in-chart Service's URL, or the external one. */}}
{{- define "pdserve.redisHost" -}}
{{- printf "%s-redis" (include "pdserve.fullname" .) -}}
{{- end -}}

{{- define "pdserve.redisURL" -}}
{{- if .Values.redis.external.url -}}
{{- .Values.redis.external.url -}}
{{- else -}}
{{- printf "redis://%s:%d/0" (include "pdserve.redisHost" .) (int .Values.redis.port) -}}
{{- end -}}
{{- end -}}

{{- define "pdserve.redisExternal" -}}
{{- if or .Values.redis.external.url .Values.redis.external.existingSecret -}}true{{- end -}}
{{- end -}}

{{- define "pdserve.redisEnv" -}}
- name: PDSERVE_REDIS_URL
{{- if .Values.redis.external.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.existingSecret }}
      key: {{ .Values.redis.external.existingSecretKey }}
{{- else }}
  value: {{ include "pdserve.redisURL" . | quote }}
{{- end }}
{{- end -}}

{{/* --redis, except for a URL from a Secret: that one stays in the environment, where the CLI
reads PDSERVE_REDIS_URL by default, rather than in the process's visible command line. */}}
{{- define "pdserve.redisArg" -}}
{{- if not .Values.redis.external.existingSecret }}
- --redis=$(PDSERVE_REDIS_URL)
{{- end }}
{{- end -}}

{{/*
Engine settings: (values key, ConfigMap key, CLI flag). The ConfigMap carries the values that
are set; containers pass them as --flag=$(KEY), which Kubernetes expands from the environment.
*/}}
{{- define "pdserve.engineSettings" -}}
device: [ENGINE_DEVICE, --device]
dtype: [ENGINE_DTYPE, --dtype]
blockSize: [ENGINE_BLOCK_SIZE, --block-size]
maxModelLen: [ENGINE_MAX_MODEL_LEN, --max-model-len]
maxNumBatchedTokens: [ENGINE_MAX_NUM_BATCHED_TOKENS, --max-num-batched-tokens]
maxNumSeqs: [ENGINE_MAX_NUM_SEQS, --max-num-seqs]
gpuMemoryUtilization: [ENGINE_GPU_MEMORY_UTILIZATION, --gpu-memory-utilization]
kvCacheMemory: [ENGINE_KV_CACHE_MEMORY, --kv-cache-memory]
attentionBackend: [ENGINE_ATTENTION_BACKEND, --attention-backend]
{{- end -}}

{{- define "pdserve.engineArgs" -}}
{{- range $key, $setting := include "pdserve.engineSettings" . | fromYaml }}
{{- if not (kindIs "invalid" (index $.Values.engine $key)) }}
- {{ printf "%s=$(%s)" (index $setting 1) (index $setting 0) | quote }}
{{- end }}
{{- end }}
{{- if not .Values.engine.enablePrefixCaching }}
- --no-prefix-caching
{{- end }}
{{- if .Values.engine.enforceEager }}
- --enforce-eager
{{- end }}
{{- end -}}

{{/* Model flags, the same for the router (tokenizer, config) and the workers (weights). */}}
{{- define "pdserve.modelArgs" -}}
{{- $m := .Values.model -}}
{{- if eq $m.source "pvc" }}
- {{ printf "--model=/models/%s" $m.pvc.path | quote }}
{{- else if eq $m.source "image" }}
{{- if $m.image.path }}
- {{ printf "--model=%s" $m.image.path | quote }}
{{- end }}
{{- else if eq $m.source "dummy" }}
- --load-format=dummy
- {{ printf "--preset=%s" $m.dummy.preset | quote }}
- {{ printf "--dummy-seed=%d" (int $m.dummy.seed) | quote }}
{{- end }}
{{- if $m.tokenizer }}
- {{ printf "--tokenizer=%s" $m.tokenizer | quote }}
{{- end }}
{{- end -}}

{{/* Environment every pdserve container has: writable dirs, Redis, the engine ConfigMap. */}}
{{- define "pdserve.commonEnv" -}}
- name: HOME
  value: /home/pdserve
- name: PDSERVE_CACHE_DIR
  value: /var/cache/pdserve/weights
- name: TRITON_CACHE_DIR
  value: /var/cache/pdserve/triton
- name: PYTHONUNBUFFERED
  value: "1"
{{ include "pdserve.redisEnv" . }}
{{- end -}}

{{- define "pdserve.volumeMounts" -}}
- {name: home, mountPath: /home/pdserve}
- {name: cache, mountPath: /var/cache/pdserve}
- {name: tmp, mountPath: /tmp}
{{- if eq .Values.model.source "pvc" }}
- {name: models, mountPath: /models, readOnly: true}
{{- end }}
{{- end -}}

{{- define "pdserve.volumes" -}}
- name: home
  emptyDir: {sizeLimit: 1Gi}
- name: cache
  emptyDir:
    sizeLimit: {{ .Values.cache.sizeLimit }}
    {{- with .Values.cache.medium }}
    medium: {{ . }}
    {{- end }}
- name: tmp
  emptyDir: {sizeLimit: 4Gi}
{{- if eq .Values.model.source "pvc" }}
- name: models
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.claimName }}
    readOnly: true
{{- end }}
{{- end -}}

{{- define "pdserve.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{- define "pdserve.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities: {drop: [ALL]}
seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{- define "pdserve.podAnnotations" -}}
{{- $ := index . 0 -}}
checksum/engine: {{ include (print $.Template.BasePath "/configmap.yaml") $ | sha256sum }}
{{- if $.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ index . 1 | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with $.Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* A scalar as the CLI expects it: whole numbers without an exponent (Helm reads numbers as
floats, and 1048576.0 would print as 1.048576e+06). */}}
{{- define "pdserve.scalar" -}}
{{- if and (kindIs "float64" .) (eq . (float64 (int64 .))) -}}
{{- int64 . -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{/* For a container that requests no GPU. The CUDA base image sets NVIDIA_VISIBLE_DEVICES=all, which on
a node whose default runtime is NVIDIA's would hand it every GPU of the node, unaccounted. */}}
{{- define "pdserve.noGpuEnv" -}}
- name: NVIDIA_VISIBLE_DEVICES
  value: void
{{- end -}}
