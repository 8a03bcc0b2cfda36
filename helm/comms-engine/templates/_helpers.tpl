{{/* Names, labels, and the rules that tie values together (grace periods, queues, replica minimums). */}}

{{- define "comms.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "comms.fullname" -}}
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

{{/* "<fullname>-<component>", within the 63-character name limit. Call with (list $ "api"). */}}
{{- define "comms.componentName" -}}
{{- $root := index . 0 }}
{{- printf "%s-%s" (include "comms.fullname" $root | trunc (int (sub 62 (len (index . 1))))) (index . 1) | trimSuffix "-" }}
{{- end }}

{{- define "comms.selectorLabels" -}}
app.kubernetes.io/name: {{ include "comms.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "comms.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "comms.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: comms-engine
{{- end }}

{{/* Labels of one component. Call with (list $ "api"). */}}
{{- define "comms.componentLabels" -}}
{{ include "comms.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "comms.componentSelectorLabels" -}}
{{ include "comms.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "comms.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "comms.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "comms.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The smallest grace period that lets a pod drain: preStop sleep + ceil(drain grace) + 5 s of HTTP shutdown. */}}
{{- define "comms.minimumGrace" -}}
{{- $root := index . 0 }}
{{- $component := index . 1 }}
{{- add (int $component.preStopSleepSeconds) (int (ceil $root.Values.config.drain_grace_s)) 5 }}
{{- end }}

{{/* terminationGracePeriodSeconds of a component; fails the render when an explicit one is too short. */}}
{{- define "comms.terminationGrace" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 }}
{{- $component := index $root.Values $name }}
{{- $minimum := int (include "comms.minimumGrace" (list $root $component)) }}
{{- if kindIs "invalid" $component.terminationGracePeriodSeconds }}
{{- add (int $component.preStopSleepSeconds) (int (ceil $root.Values.config.drain_grace_s)) (int $root.Values.shutdownMarginSeconds) }}
{{- else if lt (int $component.terminationGracePeriodSeconds) $minimum }}
{{- fail (printf "%s.terminationGracePeriodSeconds (%d) must be at least %d: preStopSleepSeconds (%d) + config.drain_grace_s (%v, rounded up) + 5 s for the HTTP server to close" $name (int $component.terminationGracePeriodSeconds) $minimum (int $component.preStopSleepSeconds) $root.Values.config.drain_grace_s) }}
{{- else }}
{{- int $component.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* The fewest pods a component may run: what its autoscaler may go down to, else its fixed replicas. */}}
{{- define "comms.minReplicas" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 }}
{{- $component := index $root.Values $name }}
{{- if eq $name "api" }}
{{- if $component.autoscaling.enabled }}{{ int $component.autoscaling.minReplicas }}{{ else }}{{ int $component.replicas }}{{ end }}
{{- else }}
{{- if eq $component.autoscaling.mode "none" }}{{ int $component.replicas }}{{ else }}{{ int $component.autoscaling.minReplicas }}{{ end }}
{{- end }}
{{- end }}

{{/* The queues the worker consumes (config.consumer_queues), lower-cased, as a JSON list. */}}
{{- define "comms.consumedQueues" -}}
{{- $queues := list }}
{{- range (splitList "," .Values.config.consumer_queues) }}
{{- $queue := lower (trim .) }}
{{- if $queue }}{{ $queues = append $queues $queue }}{{ end }}
{{- end }}
{{- toJson $queues }}
{{- end }}

{{/* The queue-URL settings the worker scales on: worker.autoscaling.keda.queues, else the consumed queues'. */}}
{{- define "comms.scaledQueueSettings" -}}
{{- $settings := .Values.worker.autoscaling.keda.queues }}
{{- if not $settings }}
{{- $settings = list }}
{{- range (include "comms.consumedQueues" . | fromJsonArray) }}
{{- $settings = append $settings (printf "%s_queue_url" .) }}
{{- end }}
{{- end }}
{{- toJson $settings }}
{{- end }}

{{/* Fails the render when the worker would start without a queue URL it needs. */}}
{{- define "comms.checkWorkerQueues" -}}
{{- if .Values.worker.enabled }}
{{- range (include "comms.consumedQueues" . | fromJsonArray) }}
{{- $setting := printf "%s_queue_url" . }}
{{- if not (index $.Values.config $setting) }}
{{- fail (printf "the worker consumes %s (config.consumer_queues) but config.%s is empty: set it to the queue URL (COMMS_%s)" . $setting (upper $setting)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Environment shared by both roles: the ConfigMap, Secrets by reference, extra variables. */}}
{{- define "comms.envFrom" -}}
- configMapRef:
    name: {{ include "comms.fullname" . }}
{{- range .Values.envFromSecrets }}
- secretRef:
    name: {{ . }}
{{- end }}
{{- end }}

{{- define "comms.env" -}}
{{- $root := index . 0 }}
{{- $component := index . 1 }}
{{- range $root.Values.secretEnv }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .key }}
{{- end }}
{{- with $root.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- with $component.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
