{{/* One Deployment per role from the same image. Call with (list $ "api") or (list $ "worker"). */}}
{{- define "comms.deployment" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 }}
{{- $component := index $root.Values $name }}
{{- $grace := include "comms.terminationGrace" (list $root $name) }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "comms.componentName" (list $root $name) }}
  labels:
    {{- include "comms.componentLabels" (list $root $name) | nindent 4 }}
spec:
  {{- if or (and (eq $name "api") (not $component.autoscaling.enabled)) (and (eq $name "worker") (eq $component.autoscaling.mode "none")) }}
  replicas: {{ $component.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "comms.componentSelectorLabels" (list $root $name) | nindent 6 }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 25%
      maxUnavailable: 0
  template:
    metadata:
      labels:
        {{- include "comms.componentSelectorLabels" (list $root $name) | nindent 8 }}
      annotations:
        checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
        {{- with $component.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "comms.serviceAccountName" (list $root $name) }}
      automountServiceAccountToken: {{ $root.Values.serviceAccount.automountToken }}
      terminationGracePeriodSeconds: {{ $grace }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      containers:
        - name: {{ $name }}
          image: {{ include "comms.image" $root | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args: ["serve", "--role", {{ $name | quote }}]
          ports:
            - name: http
              containerPort: {{ $root.Values.config.port }}
              protocol: TCP
            - name: metrics
              containerPort: {{ $root.Values.config.metrics_port }}
              protocol: TCP
          envFrom:
            {{- include "comms.envFrom" $root | nindent 12 }}
          {{- with (include "comms.env" (list $root $component) | trim) }}
          env:
            {{- . | nindent 12 }}
          {{- end }}
          livenessProbe:
            httpGet:
              path: /healthz
              port: http
            periodSeconds: {{ $component.livenessProbe.periodSeconds }}
            timeoutSeconds: {{ $component.livenessProbe.timeoutSeconds }}
            failureThreshold: {{ $component.livenessProbe.failureThreshold }}
          readinessProbe:
            httpGet:
              path: /readyz
              port: http
            periodSeconds: {{ $component.readinessProbe.periodSeconds }}
            timeoutSeconds: {{ $component.readinessProbe.timeoutSeconds }}
            failureThreshold: {{ $component.readinessProbe.failureThreshold }}
          startupProbe:
            httpGet:
              path: /healthz
              port: http
            periodSeconds: 2
            failureThreshold: 30
          {{- if gt (int $component.preStopSleepSeconds) 0 }}
          lifecycle:
            preStop:
              exec:
                command: ["sleep", {{ $component.preStopSleepSeconds | int | toString | quote }}]
          {{- end }}
          resources:
            {{- toYaml $component.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: {{ $root.Values.tmpVolume.sizeLimit }}
      {{- with $component.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $component.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $component.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with (include "comms.topologySpread" (list $root $name) | trim) }}
      topologySpreadConstraints:
        {{- . | nindent 8 }}
      {{- end }}
{{- end }}

{{/* A PodDisruptionBudget, only when the component may never run fewer than 2 pods. */}}
{{- define "comms.pdb" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 }}
{{- $component := index $root.Values $name }}
{{- if and $component.enabled $component.podDisruptionBudget.enabled (gt (int (include "comms.minReplicas" (list $root $name))) 1) }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "comms.componentName" (list $root $name) }}
  labels:
    {{- include "comms.componentLabels" (list $root $name) | nindent 4 }}
spec:
  maxUnavailable: {{ $component.podDisruptionBudget.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "comms.componentSelectorLabels" (list $root $name) | nindent 6 }}
{{- end }}
{{- end }}
