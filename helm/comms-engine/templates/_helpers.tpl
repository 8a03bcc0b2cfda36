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

{{/*
The service account of one component (api or worker): each has its own, so each carries its own IAM role
(Outputs.ApiRoleArn / Outputs.WorkerRoleArn of deploy/cloudformation/comms-engine.yaml). Call with (list $ "api").
*/}}
{{- define "comms.serviceAccountName" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 }}
{{- $account := default (dict) (index $root.Values.serviceAccount $name) }}
{{- if $root.Values.serviceAccount.create }}
{{- default (include "comms.componentName" (list $root $name)) $account.name }}
{{- else }}
{{- required (printf "serviceAccount.%s.name is required when serviceAccount.create is false" $name) $account.name }}
{{- end }}
{{- end }}

{{/*
The annotations of one component's service account, as JSON: its roleArn (eks.amazonaws.com/role-arn, IRSA)
over its own annotations over serviceAccount.annotations (shared by both). Call with (list $ "worker").
*/}}
{{- define "comms.serviceAccountAnnotations" -}}
{{- $root := index . 0 }}
{{- $account := default (dict) (index $root.Values.serviceAccount (index . 1)) }}
{{- $annotations := dict }}
{{- with $account.roleArn }}{{ $_ := set $annotations "eks.amazonaws.com/role-arn" . }}{{ end }}
{{- $annotations = merge $annotations (deepCopy (default (dict) $account.annotations)) (deepCopy (default (dict) $root.Values.serviceAccount.annotations)) }}
{{- toJson $annotations }}
{{- end }}

{{- define "comms.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The stop budget: the worst case from SIGTERM to exit, rounded up; Settings.stop_budget_s in service/config.py:
  max(drain_grace_s + 10, poll_wait_s + 5) + 5 + 3
in-flight work drains for config.drain_grace_s and protected work (the send) gets 10 s more, alongside an open
long poll that may run config.poll_wait_s + 5 s; then the HTTP server closes within 5 s and the last spans are
exported within 3 s.
*/}}
{{- define "comms.stopBudget" -}}
{{- $config := .Values.config }}
{{- addf 8 (maxf (addf $config.drain_grace_s 10) (addf $config.poll_wait_s 5)) | ceil | int }}
{{- end }}

{{/* The smallest grace period that lets a pod stop: preStop sleep + the stop budget. */}}
{{- define "comms.minimumGrace" -}}
{{- $root := index . 0 }}
{{- $component := index . 1 }}
{{- add (int $component.preStopSleepSeconds) (int (include "comms.stopBudget" $root)) }}
{{- end }}

{{/* terminationGracePeriodSeconds of a component; fails the render when an explicit one is too short. */}}
{{- define "comms.terminationGrace" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 }}
{{- $component := index $root.Values $name }}
{{- $budget := int (include "comms.stopBudget" $root) }}
{{- $minimum := int (include "comms.minimumGrace" (list $root $component)) }}
{{- if kindIs "invalid" $component.terminationGracePeriodSeconds }}
{{- add (int $component.preStopSleepSeconds) $budget (int $root.Values.shutdownMarginSeconds) }}
{{- else if lt (int $component.terminationGracePeriodSeconds) $minimum }}
{{- fail (printf "%s.terminationGracePeriodSeconds (%d) must be at least %d: preStopSleepSeconds (%d) + the stop budget (%d s = max(config.drain_grace_s %v + 10, config.poll_wait_s %v + 5) + 5 for the HTTP server + 3 for the trace flush, rounded up)" $name (int $component.terminationGracePeriodSeconds) $minimum (int $component.preStopSleepSeconds) $budget $root.Values.config.drain_grace_s $root.Values.config.poll_wait_s) }}
{{- else }}
{{- int $component.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* Rules between settings that the schema cannot express; included by the ConfigMap, so every render runs them. */}}
{{- define "comms.checkConfig" -}}
{{- $config := .Values.config }}
{{- $needed := addf $config.ai_timeout_s $config.provider_timeout_s }}
{{- if lt (float64 $config.drain_grace_s) (float64 $needed) }}
{{- fail (printf "config.drain_grace_s (%v) must be at least config.ai_timeout_s + config.provider_timeout_s (%v + %v = %v): a stopping worker would cancel AI work it could have finished" $config.drain_grace_s $config.ai_timeout_s $config.provider_timeout_s $needed) }}
{{- end }}
{{- if eq (int $config.metrics_port) (int $config.port) }}
{{- fail (printf "config.metrics_port (%d) must differ from config.port: /metrics is served only on its own port" (int $config.metrics_port)) }}
{{- end }}
{{- if and .Values.api.enabled $config.webhooks_enabled (not $config.public_base_url) }}
{{- fail "config.public_base_url is required when the api is deployed with config.webhooks_enabled: set it to the public URL Twilio calls (e.g. https://comms.example.com), or set config.webhooks_enabled=false" }}
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

{{/* The worker's scale-in behavior (HPA autoscaling/v2 behavior): no faster than a pod can drain. */}}
{{- define "comms.workerScaleDown" -}}
{{- $scaleDown := .Values.worker.autoscaling.scaleDown }}
{{- $grace := int (include "comms.terminationGrace" (list . "worker")) }}
{{- $window := $scaleDown.stabilizationWindowSeconds }}
{{- if kindIs "invalid" $window }}{{ $window = min 3600 (max 300 $grace) }}{{ end }}
{{- $period := $scaleDown.periodSeconds }}
{{- if kindIs "invalid" $period }}{{ $period = min 1800 $grace }}{{ end }}
scaleDown:
  stabilizationWindowSeconds: {{ int $window }}
  selectPolicy: Max
  policies:
    - type: Pods
      value: {{ int $scaleDown.podsPerPeriod }}
      periodSeconds: {{ int $period }}
    - type: Percent
      value: {{ int $scaleDown.percentPerPeriod }}
      periodSeconds: {{ int $period }}
{{- end }}

{{/* topologySpreadConstraints of a component: its own, else spread over zones and nodes. */}}
{{- define "comms.topologySpread" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 }}
{{- $component := index $root.Values $name }}
{{- if kindIs "invalid" $component.topologySpreadConstraints }}
{{- range list "topology.kubernetes.io/zone" "kubernetes.io/hostname" }}
- maxSkew: 1
  topologyKey: {{ . }}
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels:
      {{- include "comms.componentSelectorLabels" (list $root $name) | nindent 6 }}
{{- end }}
{{- else if $component.topologySpreadConstraints }}
{{- toYaml $component.topologySpreadConstraints }}
{{- end }}
{{- end }}

{{/*
The TriggerAuthentication's podIdentity, in a form KEDA accepts (provider aws):
keda.roleArn: KEDA assumes it (identityOwner left out, KEDA refuses both); identityOwner workload: the role in
the WORKER's service account annotation (IRSA; the scaled Deployment's account), so it needs one; keda: the
operator's own identity.
*/}}
{{- define "comms.kedaPodIdentity" -}}
{{- $keda := .Values.worker.autoscaling.keda }}
{{- $account := .Values.serviceAccount }}
{{- $annotated := index (include "comms.serviceAccountAnnotations" (list . "worker") | fromJson) "eks.amazonaws.com/role-arn" }}
{{- if $keda.roleArn }}
{{- if eq $keda.identityOwner "workload" }}
{{- fail "worker.autoscaling.keda.roleArn and identityOwner workload are mutually exclusive in KEDA: leave identityOwner empty (KEDA assumes roleArn) or clear roleArn (KEDA assumes the workload's IRSA role)" }}
{{- end }}
provider: aws
roleArn: {{ $keda.roleArn | quote }}
{{- else }}
{{- $owner := $keda.identityOwner }}
{{- if not $owner }}{{ $owner = ternary "workload" "keda" (not (empty $annotated)) }}{{ end }}
{{- if and (eq $owner "workload") (not $annotated) $account.create }}
{{- fail "worker.autoscaling.keda.identityOwner workload needs an IRSA role on the worker's service account (serviceAccount.worker.roleArn, Outputs.WorkerRoleArn): KEDA reads its eks.amazonaws.com/role-arn annotation. With EKS Pod Identity use identityOwner keda (KEDA's own identity) or worker.autoscaling.keda.roleArn" }}
{{- end }}
provider: aws
identityOwner: {{ $owner }}
{{- end }}
{{- end }}

{{/* The queue settings KEDA scales on must be queues the worker consumes (nobody consumes the hand-off queue). */}}
{{- define "comms.checkScaledQueues" -}}
{{- $consumed := include "comms.consumedQueues" . | fromJsonArray }}
{{- range .Values.worker.autoscaling.keda.queues }}
{{- $queue := trimSuffix "_queue_url" . }}
{{- if eq $queue "handoff" }}
{{- fail "worker.autoscaling.keda.queues must not list handoff_queue_url: nothing in this chart consumes the hand-off queue, so scaling on it would only add idle workers" }}
{{- end }}
{{- if not (has $queue $consumed) }}
{{- fail (printf "worker.autoscaling.keda.queues lists %s, but the worker does not consume %s (config.consumer_queues)" . $queue) }}
{{- end }}
{{- end }}
{{- end }}
