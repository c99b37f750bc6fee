{{/* Names ---------------------------------------------------------------------------------- */}}

{{- define "pier.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's prefix for every object: "pier" for release "pier", "<release>-pier" otherwise. */}}
{{- define "pier.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "pier.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels: call with (dict "ctx" $ "component" "router"). */}}
{{- define "pier.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pier.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "pier.labels" -}}
helm.sh/chart: {{ include "pier.chart" .ctx }}
{{ include "pier.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: pier
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Cluster version the templates target (overridable: offline renders and old clusters). */}}
{{- define "pier.kubeVersion" -}}
{{- default .Capabilities.KubeVersion.Version .Values.kubeVersion }}
{{- end }}

{{- define "pier.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Secrets: the chart's own, unless an existing one is named. */}}
{{- define "pier.keysSecret" -}}
{{- default (printf "%s-keys" (include "pier.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "pier.authEnabled" -}}
{{- if or .Values.auth.existingSecret .Values.auth.appKeys .Values.auth.userKeys .Values.auth.generateAppKey }}true{{ end }}
{{- end }}

{{- define "pier.bridgeTokenSecret" -}}
{{- default (printf "%s-bridge-token" (include "pier.fullname" .)) .Values.bridgeToken.existingSecret }}
{{- end }}

{{- define "pier.redisSecret" -}}
{{- default (printf "%s-redis" (include "pier.fullname" .)) .Values.redis.auth.existingSecret }}
{{- end }}

{{- define "pier.externalRedisSecret" -}}
{{- default (printf "%s-redis-url" (include "pier.fullname" .)) .Values.externalRedis.existingSecret }}
{{- end }}

{{- define "pier.webhookSecret" -}}
{{- default (printf "%s-webhook" (include "pier.fullname" .)) .Values.jobs.webhook.existingSecret }}
{{- end }}

{{/* A Secret value kept across upgrades: the existing one if the cluster has it, else a new random one. */}}
{{- define "pier.persistentRandom" -}}
{{- $secret := lookup "v1" "Secret" .ctx.Release.Namespace .name }}
{{- if and $secret (index ($secret.data | default dict) .key) }}
{{- index $secret.data .key }}
{{- else }}
{{- randAlphaNum 40 | b64enc }}
{{- end }}
{{- end }}

{{/* PIER_REDIS_URL (and what it needs) for router and job pool. */}}
{{- define "pier.redisEnv" -}}
{{- if .Values.redis.enabled }}
{{- if .Values.redis.auth.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "pier.redisSecret" . }}
      key: password
- name: PIER_REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s-redis:6379/0" (include "pier.fullname" .) | quote }}
{{- else }}
- name: PIER_REDIS_URL
  value: {{ printf "redis://%s-redis:6379/0" (include "pier.fullname" .) | quote }}
{{- end }}
{{- else }}
- name: PIER_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "pier.externalRedisSecret" . }}
      key: url
{{- end }}
{{- end }}

{{/* A component's extra settings: `env` (PIER_* → value) and `extraEnv` (EnvVar objects). */}}
{{- define "pier.extraEnv" -}}
{{- range $name, $value := .env }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- with .extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Pod-level scheduling shared by every component: call with the component's values. */}}
{{- define "pier.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{/* By default, a component's replicas spread over zones and nodes when they can (never blocking scheduling):
one zone or node lost takes few of them. Call with (dict "ctx" $ "component" "router" "values" $router). */}}
{{- define "pier.spread" -}}
{{- if and .values.spread (not .values.topologySpreadConstraints) }}
topologySpreadConstraints:
  {{- range $key := list "topology.kubernetes.io/zone" "kubernetes.io/hostname" }}
  - maxSkew: 1
    topologyKey: {{ $key }}
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "pier.selectorLabels" (dict "ctx" $.ctx "component" $.component) | nindent 8 }}
  {{- end }}
{{- end }}
{{- end }}

{{/* The PriorityClass of session pods: the chart's own, or the one named. */}}
{{- define "pier.sessionPriorityClass" -}}
{{- $class := .Values.sessions.priorityClass }}
{{- if $class.create }}
{{- printf "%s-%s-sessions" .Release.Namespace (include "pier.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $class.name }}
{{- end }}
{{- end }}

{{- define "pier.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* OpenTelemetry export (tracing.otlpEndpoint) of router, job pool or operator:
call with (dict "ctx" $ "component" "router"). Nothing when no endpoint is set. */}}
{{- define "pier.tracingEnv" -}}
{{- $tracing := .ctx.Values.tracing }}
{{- if $tracing.otlpEndpoint }}
- {name: OTEL_EXPORTER_OTLP_ENDPOINT, value: {{ $tracing.otlpEndpoint | quote }}}
- {name: OTEL_SERVICE_NAME, value: {{ printf "pier-%s" .component | quote }}}
- {name: OTEL_TRACES_SAMPLER, value: {{ $tracing.sampler | quote }}}
{{- with $tracing.samplerArg }}
- {name: OTEL_TRACES_SAMPLER_ARG, value: {{ . | quote }}}
{{- end }}
- name: K8S_POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
{{- $attributes := list (printf "k8s.namespace.name=%s" .ctx.Release.Namespace) "k8s.pod.name=$(K8S_POD_NAME)" }}
{{- range $key, $value := $tracing.resourceAttributes }}
{{- $attributes = append $attributes (printf "%s=%s" $key $value) }}
{{- end }}
- {name: OTEL_RESOURCE_ATTRIBUTES, value: {{ join "," $attributes | quote }}}
{{- with $tracing.headersSecret }}
- name: OTEL_EXPORTER_OTLP_HEADERS
  valueFrom: {secretKeyRef: {name: {{ . }}, key: headers}}
{{- end }}
{{- end }}
{{- end }}
