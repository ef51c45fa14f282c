{{/* Names, labels, the image, and the Ray pod template shared by the head and the worker groups. */}}

{{- define "colabel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "colabel.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "colabel.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "colabel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: include "colabel.selectorLabels" (list $ "hypha") */}}
{{- define "colabel.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "colabel.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "colabel.image" -}}
{{ printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Ray head's and workers' image: ray.image.repository / ray.image.tag, each defaulting to the global one.
  Values added after 0.1.0 are read with dig/default: `helm upgrade --reuse-values` renders with the values of the
  release's older chart, which lack them. */}}
{{- define "colabel.rayImage" -}}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) (dig "image" "tag" "" .Values.ray) -}}
{{ printf "%s:%s" (default .Values.image.repository (dig "image" "repository" "" .Values.ray)) $tag }}
{{- end }}

{{- define "colabel.jwtSecretKey" -}}
{{ default "jwt-secret" .Values.hypha.rootToken.jwtSecretKey }}
{{- end }}

{{/* ray.networkPolicy with its defaults (see colabel.rayImage about --reuse-values) */}}
{{- define "colabel.networkPolicy" -}}
{{- $values := dig "networkPolicy" dict .Values.ray -}}
{{- dict "enabled" (dig "enabled" true $values) "operatorNamespace" (dig "operatorNamespace" "default" $values) "operatorPodLabels" (dig "operatorPodLabels" dict $values) "extraIngress" (dig "extraIngress" list $values) | toJson -}}
{{- end }}

{{- define "colabel.hyphaServiceName" -}}
{{ include "colabel.fullname" . }}-hypha
{{- end }}

{{- define "colabel.rayServiceName" -}}
{{ include "colabel.fullname" . }}-ray
{{- end }}

{{/* KubeRay names the RayService's head Service <rayservice>-head-svc; Ray Client listens on 10001. */}}
{{- define "colabel.rayAddress" -}}
ray://{{ include "colabel.rayServiceName" . }}-head-svc:10001
{{- end }}

{{- define "colabel.rootTokenSecretName" -}}
{{ default (printf "%s-root-token" (include "colabel.fullname" .)) .Values.hypha.rootToken.existingSecret }}
{{- end }}

{{/* The cache volume's mount path: colabel.apps.cluster.CACHE_DIR, baked into files/serve-config*.yaml. */}}
{{- define "colabel.cacheMountPath" -}}
/var/cache/colabel
{{- end }}

{{- define "colabel.serveConfigFile" -}}
{{ ternary "files/serve-config-gpu.yaml" "files/serve-config.yaml" .Values.ray.gpu.enabled }}
{{- end }}

{{/* An environment variable holding the root token, from the Secret (never a literal):
  include "colabel.rootTokenEnv" (list $ "COLABEL_TOKEN") */}}
{{- define "colabel.rootTokenEnv" -}}
{{- $root := index . 0 -}}
- name: {{ index . 1 }}
  valueFrom:
    secretKeyRef:
      name: {{ include "colabel.rootTokenSecretName" $root }}
      key: {{ $root.Values.hypha.rootToken.secretKey }}
{{- end }}

{{/* HYPHA_JWT_SECRET, the key Hypha signs its tokens with, from the same Secret: include "colabel.jwtSecretEnv" $ */}}
{{- define "colabel.jwtSecretEnv" -}}
- name: HYPHA_JWT_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "colabel.rootTokenSecretName" . }}
      key: {{ include "colabel.jwtSecretKey" . }}
{{- end }}

{{/* The data of the Secret NAME in the release namespace, as JSON: {} when there is none, and always under
  `helm template`, Argo CD or Flux, where lookup has no cluster to ask.
  include "colabel.secretData" (list $ NAME) | fromJson */}}
{{- define "colabel.secretData" -}}
{{- $root := index . 0 -}}
{{- $found := lookup "v1" "Secret" $root.Release.Namespace (index . 1) | default dict -}}
{{- $found.data | default dict | toJson -}}
{{- end }}

{{/* The gateway's heartbeat file (`colabel models --heartbeat`), on an emptyDir: made once its services are
  registered on Hypha, touched every 10 s while its Ray cluster answers and Hypha still lists its services. */}}
{{- define "colabel.heartbeatDir" -}}
/run/colabel
{{- end }}

{{- define "colabel.heartbeatFile" -}}
{{ include "colabel.heartbeatDir" . }}/alive
{{- end }}

{{/* An exec probe command: the heartbeat file exists and was modified less than SECONDS ago (/bin/sh, test, stat
  and date of the image's Debian base): include "colabel.heartbeatProbe" (list $ 30) */}}
{{- define "colabel.heartbeatProbe" -}}
{{- $file := include "colabel.heartbeatFile" (index . 0) -}}
exec:
  command:
    - /bin/sh
    - -c
    - {{ printf "test -f %s && test $(( $(date +%%s) - $(stat -c %%Y %s) )) -lt %d" $file $file (int (index . 1)) | quote }}
{{- end }}

{{/* The Ray pods of this release (head and worker groups), for the NetworkPolicy. */}}
{{- define "colabel.rayPodSelector" -}}
matchLabels:
  app.kubernetes.io/name: {{ include "colabel.name" . }}
  app.kubernetes.io/instance: {{ .Release.Name }}
matchExpressions:
  - key: app.kubernetes.io/component
    operator: In
    values: [ray-head, ray-cpu, ray-gpu]
{{- end }}

{{/*
Ray pod template, shared by the head and every worker group:
  include "colabel.rayPodTemplate" (dict "root" $ "group" "head" "spec" .Values.ray.head "gpus" 0 "ports" true)
*/}}
{{- define "colabel.rayPodTemplate" -}}
{{- $root := .root -}}
{{- $values := $root.Values -}}
metadata:
  labels:
    {{- include "colabel.labels" $root | nindent 4 }}
    app.kubernetes.io/component: ray-{{ .group }}
spec:
  {{- /* The autoscaler sidecar KubeRay adds to the head (enableInTreeAutoscaling) lists and patches the cluster's
    pods with the head's ServiceAccount token (KubeRay makes its RBAC); no other Ray pod talks to the API server. */}}
  automountServiceAccountToken: {{ and (eq .group "head") $values.ray.enableInTreeAutoscaling }}
  {{- with $values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $values.podSecurityContext | nindent 4 }}
  containers:
    - name: ray-{{ .group }}
      image: {{ include "colabel.rayImage" $root }}
      imagePullPolicy: {{ $values.image.pullPolicy }}
      securityContext:
        {{- toYaml (merge (dict "readOnlyRootFilesystem" $values.ray.readOnlyRootFilesystem) (omit $values.containerSecurityContext "readOnlyRootFilesystem")) | nindent 8 }}
      env:
        - name: HOME
          value: /tmp
        - name: COLABEL_CACHE_DIR
          value: {{ include "colabel.cacheMountPath" $root }}/weights
        - name: COLABEL_EMBEDDING_DIR
          value: {{ include "colabel.cacheMountPath" $root }}/embeddings
        - name: RAY_USAGE_STATS_ENABLED
          value: "0"
        {{- with $values.ray.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if .ports }}
      ports:
        - {containerPort: 6379, name: gcs-server}
        - {containerPort: 8265, name: dashboard}
        - {containerPort: 10001, name: client}
        - {containerPort: 8000, name: serve}
      {{- end }}
      resources:
        {{- $resources := deepCopy .spec.resources }}
        {{- if gt (int .gpus) 0 }}
        {{- $_ := set $resources "limits" (merge (dict "nvidia.com/gpu" (int .gpus)) (default (dict) $resources.limits)) }}
        {{- end }}
        {{- toYaml $resources | nindent 8 }}
      volumeMounts:
        - {name: tmp, mountPath: /tmp}
        - {name: dshm, mountPath: /dev/shm}
        - {name: cache, mountPath: {{ include "colabel.cacheMountPath" $root }}}
  volumes:
    - name: tmp
      emptyDir: {}
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $values.ray.shmSize }}
    - name: cache
      {{- if $values.cache.enabled }}
      persistentVolumeClaim:
        claimName: {{ default (printf "%s-cache" (include "colabel.fullname" $root)) $values.cache.existingClaim }}
      {{- else }}
      emptyDir: {}
      {{- end }}
  {{- with .spec.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .spec.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .spec.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* The hardened pod-level bits every non-Ray pod shares (Hypha, gateway). */}}
{{- define "colabel.podCommon" -}}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}
