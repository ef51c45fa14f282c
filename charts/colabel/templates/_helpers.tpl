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
  include "colabel.rootTokenEnv" (list $ "ROOT_TOKEN") */}}
{{- define "colabel.rootTokenEnv" -}}
{{- $root := index . 0 -}}
- name: {{ index . 1 }}
  valueFrom:
    secretKeyRef:
      name: {{ include "colabel.rootTokenSecretName" $root }}
      key: {{ $root.Values.hypha.rootToken.secretKey }}
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
  automountServiceAccountToken: false
  {{- with $values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $values.podSecurityContext | nindent 4 }}
  containers:
    - name: ray-{{ .group }}
      image: {{ include "colabel.image" $root }}
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
