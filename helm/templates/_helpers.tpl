{{/*
Names. Component objects are "<fullname>-<component>", cut to 63 characters
so that Service names stay valid DNS labels.
*/}}
{{- define "agentry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "agentry.fullname" -}}
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

{{/* agentry.componentName takes (dict "root" $ "component" "api"). */}}
{{- define "agentry.componentName" -}}
{{- printf "%s-%s" (include "agentry.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "agentry.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels. Both take (dict "root" $ "component" "api"); component may be empty
for objects shared by all components.
*/}}
{{- define "agentry.selectorLabels" -}}
app.kubernetes.io/name: {{ include "agentry.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{- define "agentry.labels" -}}
{{ include "agentry.selectorLabels" . }}
helm.sh/chart: {{ include "agentry.chart" .root }}
app.kubernetes.io/version: {{ include "agentry.imageTag" .root | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: agentry
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "agentry.imageTag" -}}
{{- .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "agentry.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (include "agentry.imageTag" .) }}
{{- end }}
{{- end }}

{{- define "agentry.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "agentry.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
agentry.secretName is the Secret every pod takes its secret settings from:
existingSecret, or the chart's own.
*/}}
{{- define "agentry.secretName" -}}
{{- .Values.existingSecret | default (include "agentry.fullname" .) }}
{{- end }}

{{/*
agentry.publicUrl is config.publicUrl, else https://<first ingress host>
when the Ingress is on, else empty.
*/}}
{{- define "agentry.publicUrl" -}}
{{- if .Values.config.publicUrl }}
{{- .Values.config.publicUrl }}
{{- else if and .Values.api.ingress.enabled .Values.api.ingress.hosts }}
{{- with get (first .Values.api.ingress.hosts) "host" }}
{{- printf "https://%s" . }}
{{- end }}
{{- end }}
{{- end }}

{{/*
agentry.configData renders the non-secret settings as a map of AGENTRY_*
environment variables: the data of the ConfigMaps.
*/}}
{{- define "agentry.configData" -}}
{{- $c := .Values.config }}
{{- $data := dict
  "AGENTRY_ENV" $c.env
  "AGENTRY_LOG_LEVEL" $c.logLevel
  "AGENTRY_HTTP_ADDR" (printf ":%d" (int .Values.api.port))
  "AGENTRY_WORKER_ADDR" (printf ":%d" (int .Values.worker.port))
  "AGENTRY_SCHEDULER_ADDR" (printf ":%d" (int .Values.scheduler.port))
  "AGENTRY_SHUTDOWN_TIMEOUT" (printf "%ds" (int $c.shutdownTimeoutSeconds))
  "AGENTRY_WORKER_CONCURRENCY" (printf "%d" (int $c.workerConcurrency))
  "AGENTRY_ORG_MAX_IN_FLIGHT" (printf "%d" (int $c.orgMaxInFlight))
  "AGENTRY_REDIS_PREFIX" $c.redisPrefix
}}
{{- $publicUrl := include "agentry.publicUrl" . }}
{{- with $publicUrl }}
{{- $_ := set $data "AGENTRY_PUBLIC_URL" . }}
{{- end }}
{{- with $c.allowedOrigins | default (compact (list $publicUrl)) }}
{{- $_ := set $data "AGENTRY_ALLOWED_ORIGINS" (join "," .) }}
{{- end }}
{{- with $c.trustedProxies }}
{{- $_ := set $data "AGENTRY_TRUSTED_PROXIES" (join "," .) }}
{{- end }}
{{- with $c.egressAllowCidrs }}
{{- $_ := set $data "AGENTRY_EGRESS_ALLOW_CIDRS" (join "," .) }}
{{- end }}
{{- with $c.adminEmail }}
{{- $_ := set $data "AGENTRY_ADMIN_EMAIL" . }}
{{- end }}
{{- range $name, $value := $c.extra }}
{{- /* A values file's numbers are floats: a whole one is written as an
integer (toString would write 2097152 as 2.097152e+06, which no setting reads). */}}
{{- if and (kindIs "float64" $value) (eq $value (floor $value)) }}
{{- $_ := set $data $name (printf "%d" (int64 $value)) }}
{{- else }}
{{- $_ := set $data $name (toString $value) }}
{{- end }}
{{- end }}
{{- toYaml $data }}
{{- end }}

{{/*
agentry.secretData renders the secret settings as the base64 data of a
Secret. It takes (dict "root" $ "seedAdmin" bool): the admin password is only
given to the migration Job that seeds the admin.
*/}}
{{- define "agentry.secretData" -}}
{{- $s := .root.Values.secrets }}
{{- $values := dict
  "AGENTRY_DATABASE_URL" $s.databaseUrl
  "AGENTRY_REDIS_URL" $s.redisUrl
  "AGENTRY_JWT_SECRET" $s.jwtSecret
  "AGENTRY_SECRETS_KEY" $s.secretsKey
}}
{{- if .seedAdmin }}
{{- $_ := set $values "AGENTRY_ADMIN_PASSWORD" $s.adminPassword }}
{{- end }}
{{- $data := dict }}
{{- range $name, $value := $values }}
{{- if $value }}
{{- $_ := set $data $name (b64enc $value) }}
{{- end }}
{{- end }}
{{- if $data }}
{{- toYaml $data }}
{{- else -}}
{}
{{- end }}
{{- end }}

{{/*
agentry.terminationGracePeriodSeconds takes (dict "root" $ "preStopSleepSeconds" n):
the preStop sleep, the drain (config.shutdownTimeoutSeconds) and the padding.
*/}}
{{- define "agentry.terminationGracePeriodSeconds" -}}
{{- $v := .root.Values }}
{{- add (int (.preStopSleepSeconds | default 0)) (int $v.config.shutdownTimeoutSeconds) (int $v.terminationGracePaddingSeconds) }}
{{- end }}

{{/*
agentry.envFrom takes (dict "root" $ "configMap" name "secret" name): the
envFrom list of a container.
*/}}
{{- define "agentry.envFrom" -}}
- configMapRef:
    name: {{ .configMap }}
- secretRef:
    name: {{ .secret }}
{{- with .root.Values.extraEnvFrom }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
agentry.podSchedulingFields renders the scheduling fields of a pod spec from
a values block with nodeSelector, tolerations, affinity and, for
Deployments, topologySpreadConstraints. It takes (dict "root" $ "component"
name "values" block).
*/}}
{{- define "agentry.podSchedulingFields" -}}
{{- with .values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .values.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with get .values "topologySpreadConstraints" }}
{{- $selector := dict "matchLabels" (include "agentry.selectorLabels" $ | fromYaml) }}
topologySpreadConstraints:
{{- range . }}
{{- $constraint := deepCopy . }}
{{- if not (hasKey $constraint "labelSelector") }}
{{- $_ := set $constraint "labelSelector" $selector }}
{{- $_ := set $constraint "matchLabelKeys" (list "pod-template-hash") }}
{{- end }}
  - {{ toYaml $constraint | indent 4 | trim }}
{{- end }}
{{- end }}
{{- end }}

{{/*
agentry.probe takes (dict "probe" values "path" "/healthz"): the probe's
timing from values, with an httpGet on the container's "http" port.
*/}}
{{- define "agentry.probe" -}}
{{- $probe := deepCopy (.probe | default dict) }}
{{- $_ := set $probe "httpGet" (dict "path" .path "port" "http") }}
{{- toYaml $probe }}
{{- end }}

{{/*
agentry.deployment renders the Deployment of a component. It takes
(dict "root" $ "component" "api" "args" list "autoscaled" bool
"preStopSleepSeconds" n); the component's values are .Values.<component>
and its binary /usr/local/bin/<component>.
*/}}
{{- define "agentry.deployment" -}}
{{- $root := .root }}
{{- $v := index $root.Values .component }}
{{- $labels := dict "root" $root "component" .component }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "agentry.componentName" $labels }}
  labels:
    {{- include "agentry.labels" $labels | nindent 4 }}
spec:
  {{- if not .autoscaled }}
  replicas: {{ $v.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "agentry.selectorLabels" $labels | nindent 6 }}
  strategy:
    {{- toYaml $v.strategy | nindent 4 }}
  template:
    metadata:
      labels:
        {{- include "agentry.selectorLabels" $labels | nindent 8 }}
        {{- with merge (deepCopy ($v.podLabels | default dict)) ($root.Values.podLabels | default dict) }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        checksum/config: {{ include "agentry.configData" $root | sha256sum }}
        {{- if not $root.Values.existingSecret }}
        checksum/secret: {{ include "agentry.secretData" (dict "root" $root "seedAdmin" false) | sha256sum }}
        {{- end }}
        {{- with merge (deepCopy ($v.podAnnotations | default dict)) ($root.Values.podAnnotations | default dict) }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "agentry.serviceAccountName" $root }}
      automountServiceAccountToken: {{ $root.Values.serviceAccount.automountToken }}
      enableServiceLinks: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      terminationGracePeriodSeconds: {{ include "agentry.terminationGracePeriodSeconds" (dict "root" $root "preStopSleepSeconds" .preStopSleepSeconds) }}
      {{- with include "agentry.podSchedulingFields" (dict "root" $root "component" .component "values" $v) | trim }}
      {{- . | nindent 6 }}
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ include "agentry.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: [{{ printf "/usr/local/bin/%s" .component | quote }}]
          {{- with .args }}
          args:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          ports:
            - name: http
              containerPort: {{ $v.port }}
              protocol: TCP
          envFrom:
            {{- include "agentry.envFrom" (dict "root" $root "configMap" (include "agentry.fullname" $root) "secret" (include "agentry.secretName" $root)) | nindent 12 }}
          {{- with concat ($root.Values.extraEnv | default list) ($v.extraEnv | default list) }}
          env:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          startupProbe:
            {{- include "agentry.probe" (dict "probe" $v.startupProbe "path" "/healthz") | nindent 12 }}
          livenessProbe:
            {{- include "agentry.probe" (dict "probe" $v.livenessProbe "path" "/healthz") | nindent 12 }}
          readinessProbe:
            {{- include "agentry.probe" (dict "probe" $v.readinessProbe "path" "/readyz") | nindent 12 }}
          {{- with .preStopSleepSeconds }}
          lifecycle:
            preStop:
              sleep:
                seconds: {{ . }}
          {{- end }}
          resources:
            {{- toYaml $v.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
{{- end }}

{{/*
agentry.pdb renders the PodDisruptionBudget of a component, if enabled. It
takes (dict "root" $ "component" "api").
*/}}
{{- define "agentry.pdb" -}}
{{- $pdb := (index .root.Values .component).pdb }}
{{- if $pdb.enabled }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "agentry.componentName" . }}
  labels:
    {{- include "agentry.labels" . | nindent 4 }}
spec:
  maxUnavailable: {{ $pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "agentry.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end }}

{{/*
agentry.metricsService renders the headless Service through which the
Prometheus Operator finds the worker or scheduler pods. It takes
(dict "root" $ "component" "worker").
*/}}
{{- define "agentry.metricsService" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "agentry.componentName" . }}
  labels:
    {{- include "agentry.labels" . | nindent 4 }}
spec:
  type: ClusterIP
  clusterIP: None
  ports:
    - name: http
      port: {{ (index .root.Values .component).port }}
      targetPort: http
      protocol: TCP
  selector:
    {{- include "agentry.selectorLabels" . | nindent 4 }}
{{- end }}

{{/*
agentry.validate stops the render on values that cannot work together.
values.schema.json checks each value on its own. It renders nothing.
*/}}
{{- define "agentry.validate" -}}
{{- $v := .Values }}
{{- if and $v.worker.autoscaling.enabled (eq $v.worker.autoscaling.kind "hpa") (lt (int $v.worker.autoscaling.minReplicas) 1) }}
{{- fail "worker.autoscaling.minReplicas must be at least 1 with kind hpa; only keda scales to zero" }}
{{- end }}
{{- if and $v.api.autoscaling.enabled (not (or $v.api.autoscaling.targetCPUUtilizationPercentage $v.api.autoscaling.targetMemoryUtilizationPercentage)) }}
{{- fail "api.autoscaling needs targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage" }}
{{- end }}
{{- if and $v.migrations.enabled $v.migrations.seedAdmin (not $v.config.adminEmail) }}
{{- fail "migrations.seedAdmin needs config.adminEmail" }}
{{- end }}
{{- if and (eq $v.config.env "production") (not $v.existingSecret) (not $v.extraEnvFrom) }}
{{- $given := list }}
{{- range $v.extraEnv }}{{ $given = append $given .name }}{{ end }}
{{- $missing := list }}
{{- range $key, $name := dict "databaseUrl" "AGENTRY_DATABASE_URL" "redisUrl" "AGENTRY_REDIS_URL" "jwtSecret" "AGENTRY_JWT_SECRET" "secretsKey" "AGENTRY_SECRETS_KEY" }}
{{- if not (or (index $v.secrets $key) (has $name $given)) }}{{ $missing = append $missing (printf "secrets.%s" $key) }}{{ end }}
{{- end }}
{{- if $missing }}
{{- fail (printf "production needs %s (or existingSecret, or the variables in extraEnv or extraEnvFrom): the pods would not start" (join ", " $missing)) }}
{{- end }}
{{- end }}
{{- if and $v.migrations.enabled $v.migrations.seedAdmin (eq $v.config.env "production") (not $v.existingSecret) (not $v.secrets.adminPassword) }}
{{- fail "migrations.seedAdmin in production needs secrets.adminPassword (or AGENTRY_ADMIN_PASSWORD in existingSecret): the seed would fail inside the upgrade" }}
{{- end }}
{{- end }}

{{/*
agentry.migrationServiceAccountName is the migration Job's ServiceAccount:
migrations.serviceAccountName, else an existing serviceAccount.name (one the
chart does not create, so it exists before the pre-install hook), else empty
for the namespace's default.
*/}}
{{- define "agentry.migrationServiceAccountName" -}}
{{- if .Values.migrations.serviceAccountName }}
{{- .Values.migrations.serviceAccountName }}
{{- else if not .Values.serviceAccount.create }}
{{- .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
agentry.migrationContainer renders one container of the migration Job,
running `api <args>`. It takes (dict "root" $ "name" n "args" list
"configMap" name "secret" name).
*/}}
{{- define "agentry.migrationContainer" -}}
{{- $root := .root }}
name: {{ .name }}
image: {{ include "agentry.image" $root }}
imagePullPolicy: {{ $root.Values.image.pullPolicy }}
command: ["/usr/local/bin/api"]
args:
  {{- toYaml .args | nindent 2 }}
envFrom:
  {{- include "agentry.envFrom" . | nindent 2 }}
{{- with $root.Values.extraEnv }}
env:
  {{- toYaml . | nindent 2 }}
{{- end }}
resources:
  {{- toYaml $root.Values.migrations.resources | nindent 2 }}
securityContext:
  {{- toYaml $root.Values.securityContext | nindent 2 }}
{{- end }}
