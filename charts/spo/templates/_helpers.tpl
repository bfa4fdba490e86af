{{/* The chart's name, and the release's full name (63 characters at most: a DNS label). */}}
{{- define "spo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "spo.fullname" -}}
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

{{- define "spo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The standard labels (app.kubernetes.io/*, helm.sh/chart) of every object. */}}
{{- define "spo.labels" -}}
helm.sh/chart: {{ include "spo.chart" . }}
{{ include "spo.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: spo-pipeline
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "spo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "spo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "spo.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* registry/repository@digest, else registry/repository:tag (tag default: <appVersion>-cuda). */}}
{{- define "spo.image" -}}
{{- $repo := .Values.image.repository }}
{{- if .Values.image.registry }}{{ $repo = printf "%s/%s" .Values.image.registry $repo }}{{ end }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repo .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repo (default (printf "%s-cuda" .Chart.AppVersion) .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "spo.checkpointClaim" -}}
{{- if .Values.storage.checkpoints.existingClaim }}
{{- .Values.storage.checkpoints.existingClaim }}
{{- else if .Values.storage.checkpoints.create }}
{{- printf "%s-checkpoints" (include "spo.fullname" .) }}
{{- end }}
{{- end }}

{{- define "spo.dataClaim" -}}
{{- if .Values.storage.data.existingClaim }}
{{- .Values.storage.data.existingClaim }}
{{- else if .Values.storage.data.create }}
{{- printf "%s-data" (include "spo.fullname" .) }}
{{- end }}
{{- end }}

{{- define "spo.dvcSecret" -}}
{{- if .Values.dvcRemote.credentials.existingSecret }}
{{- .Values.dvcRemote.credentials.existingSecret }}
{{- else if .Values.dvcRemote.credentials.create }}
{{- printf "%s-dvc" (include "spo.fullname" .) }}
{{- end }}
{{- end }}

{{/* Is any pool multi-node or multi-process (train then runs as a TrainJob)? */}}
{{- define "spo.trainJob" -}}
{{- $pool := index .Values.pools (default .Values.defaultPool (index .Values.steps "train")) }}
{{- if or (gt (int (default 1 $pool.nodes)) 1) (gt (int (default 1 $pool.processesPerNode)) 1) }}true{{ end }}
{{- end }}

{{/* One pool in the platform file's own field names (spo.kube.platform.Pool). */}}
{{- define "spo.platformPool" -}}
{{- $p := . }}
{{- with $p.accelerator }}
accelerator: {type: {{ .type | quote }}, count: {{ .count }}}
{{- end }}
{{- with $p.nodeSelector }}
node_selector: {{ toJson . }}
{{- end }}
{{- with $p.tolerations }}
tolerations:
{{- range . }}
  - {{ toJson (dict "key" .key "operator" (default "Equal" .operator) "value" .value "effect" .effect "toleration_seconds" .tolerationSeconds) }}
{{- end }}
{{- end }}
{{- with $p.affinity }}
node_affinity:
{{- range . }}
  - match_expressions: {{ toJson .matchExpressions }}
    weight: {{ if .weight }}{{ .weight }}{{ else }}null{{ end }}
{{- end }}
{{- end }}
{{- with $p.requests }}
requests: {{ toJson . }}
{{- end }}
{{- with $p.limits }}
limits: {{ toJson . }}
{{- end }}
{{- if $p.retries }}
retries: {{ $p.retries }}
{{- end }}
{{- with $p.retryBackoff }}
retry_backoff: {{ . | quote }}
{{- end }}
{{- with $p.env }}
env: {{ toJson . }}
{{- end }}
{{- with $p.secretEnv }}
secret_env: {{ toJson . }}
{{- end }}
{{- with $p.nodes }}
nodes: {{ . }}
{{- end }}
{{- with $p.processesPerNode }}
processes_per_node: {{ . }}
{{- end }}
{{- with $p.activeDeadline }}
active_deadline: {{ . | quote }}
{{- end }}
{{- with $p.trainerRuntime }}
trainer_runtime: {{ . | quote }}
{{- end }}
{{- end }}

{{/* The platform file (spo.kube.platform) the hook Job compiles the pipeline with. */}}
{{- define "spo.platform" -}}
{{- $pools := .Values.pools }}
{{- if not (hasKey $pools .Values.defaultPool) }}
{{- fail (printf "defaultPool: pool %q is not defined under pools (%s)" .Values.defaultPool (keys $pools | sortAlpha | join ", ")) }}
{{- end }}
{{- range $step, $pool := .Values.steps }}
{{- if not (hasKey $pools $pool) }}
{{- fail (printf "steps.%s: pool %q is not defined under pools (%s)" $step $pool (keys $pools | sortAlpha | join ", ")) }}
{{- end }}
{{- end }}
{{- $mount := .Values.storage.checkpoints.mountPath }}
{{- if or (eq (trimSuffix "/" $mount) "/kfp-workspace") (hasPrefix "/kfp-workspace/" $mount) }}
{{- fail (printf "storage.checkpoints.mountPath: %s lies under KFP's workspace mount /kfp-workspace, where KFP refuses a user volume (backend/src/v2/driver/driver.go)" $mount) }}
{{- end }}
{{- $train := index $pools (.Values.steps.train | default .Values.defaultPool) }}
{{- if and (or (gt (int ($train.nodes | default 1)) 1) (gt (int ($train.processesPerNode | default 1)) 1)) .Values.storage.checkpoints.create (not .Values.storage.checkpoints.existingClaim) (not (has "ReadWriteMany" .Values.storage.checkpoints.accessModes)) }}
{{- fail "storage.checkpoints.accessModes: the train pool is multi-node (a TrainJob), whose launcher and trainer pods mount the checkpoint volume at once from different nodes: it needs ReadWriteMany (and a storageClass that provides it)" }}
{{- end }}
{{- if and .Values.launcherPool (not (hasKey $pools .Values.launcherPool)) }}
{{- fail (printf "launcherPool: pool %q is not defined under pools" .Values.launcherPool) }}
{{- end }}
image: {{ include "spo.image" . | quote }}
image_pull_policy: {{ .Values.image.pullPolicy }}
image_pull_secrets: {{ toJson .Values.image.pullSecrets }}
workspace:
  size: {{ .Values.storage.workspace.size | quote }}
  storage_class: {{ if .Values.storage.workspace.storageClass }}{{ .Values.storage.workspace.storageClass | quote }}{{ else }}null{{ end }}
  access_modes: {{ toJson .Values.storage.workspace.accessModes }}
pools:
{{- range $name, $pool := .Values.pools }}
  {{ $name }}:
{{- $body := include "spo.platformPool" $pool | trim }}
{{- if $body }}
{{ $body | indent 4 }}
{{- else }} {}
{{- end }}
{{- end }}
default_pool: {{ .Values.defaultPool }}
steps: {{ toJson .Values.steps }}
caching: {{ .Values.caching }}
{{- with .Values.launcherPool }}
launcher_pool: {{ . }}
{{- end }}
{{- if eq .Values.judge.backend "openai" }}
judge_api_key: {name: {{ .Values.judge.apiKey.existingSecret | quote }}, key: {{ .Values.judge.apiKey.key | quote }}}
{{- end }}
{{- if include "spo.checkpointClaim" . }}
checkpoints: {claim: {{ include "spo.checkpointClaim" . | quote }}, mount_path: {{ .Values.storage.checkpoints.mountPath | quote }}}
{{- end }}
{{- if include "spo.dataClaim" . }}
data_volume: {claim: {{ include "spo.dataClaim" . | quote }}, mount_path: {{ .Values.storage.data.mountPath | quote }}}
{{- end }}
{{- if .Values.dvcRemote.enabled }}
dvc_remote:
  url: {{ .Values.dvcRemote.url | quote }}
  name: {{ .Values.dvcRemote.name | quote }}
  endpoint_url: {{ if .Values.dvcRemote.endpoint }}{{ .Values.dvcRemote.endpoint | quote }}{{ else }}null{{ end }}
  region: {{ if .Values.dvcRemote.region }}{{ .Values.dvcRemote.region | quote }}{{ else }}null{{ end }}
{{- if include "spo.dvcSecret" . }}
  credentials_secret:
    name: {{ include "spo.dvcSecret" . | quote }}
    access_key_id_key: {{ .Values.dvcRemote.credentials.accessKeyIdKey | quote }}
    secret_access_key_key: {{ .Values.dvcRemote.credentials.secretAccessKeyKey | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* The arguments of `spo pipeline submit` common to the hook and the test. */}}
{{- define "spo.submitArgs" -}}
- {{ printf "--host=%s" .Values.kfp.host | quote }}
- --params=/work/params.yaml
- --platform=/etc/spo/platform.yaml
- {{ printf "--pipeline-name=%s" .Values.kfp.pipelineName | quote }}
- {{ printf "--experiment=%s" .Values.kfp.experiment | quote }}
{{- with .Values.kfp.namespace }}
- {{ printf "--namespace=%s" . | quote }}
{{- end }}
{{- /* refused unless KFP runs the pipeline's pods where this release put the PVC, Secrets and Role */}}
- {{ printf "--workload-namespace=%s" .Release.Namespace | quote }}
- {{ printf "--kfp-namespace=%s" .Values.networkPolicy.kfpNamespace | quote }}
{{- if eq .Values.kfp.pipelineStore "kubernetes" }}
- --store=kubernetes
{{- end }}
{{- if ne .Values.kfp.auth.mode "none" }}
- --token-file=/var/run/secrets/kfp/token
{{- else }}
- --token-file=/nonexistent
{{- end }}
{{- end }}

{{/* The shell lines that write the params file the pipeline is compiled with: the chart's
     params.yaml, with pipeline.overrides resolved into it (`spo config -S`). */}}
{{- define "spo.prepareParams" -}}
cp /etc/spo/dvc.yaml /work/dvc.yaml && cp /etc/spo/dvcignore /work/.dvcignore
{{- if .Values.pipeline.overrides }}
spo config -p /etc/spo/params.yaml{{ range $key, $value := .Values.pipeline.overrides }} -S {{ printf "%s=%s" $key (toJson $value) | squote }}{{ end }} > /work/params.yaml
{{- else }}
cp /etc/spo/params.yaml /work/params.yaml
{{- end }}
{{- end }}

{{/* The run's pipeline parameters as submit arguments, one list item each: the knobs, and
     data_dir on the data volume. */}}
{{- define "spo.runArgs" -}}
{{- if include "spo.dataClaim" . }}
- {{ printf "--arg=data_dir=%s" .Values.storage.data.mountPath | quote }}
{{- end }}
{{- if eq .Values.judge.backend "openai" }}
- --arg=judge_backend=openai
- {{ printf "--arg=judge_model=%s" .Values.judge.model | quote }}
{{- with .Values.judge.baseUrl }}
- {{ printf "--set=judge.openai.base_url=%s" . | quote }}
{{- end }}
{{- end }}
{{- range $key, $value := .Values.pipeline.parameters }}
- {{ printf "--arg=%s=%s" $key (toJson $value) | quote }}
{{- end }}
{{- end }}

{{/* Pod-level settings every pod of the chart shares. */}}
{{- define "spo.podSpec" -}}
serviceAccountName: {{ include "spo.serviceAccountName" . }}
automountServiceAccountToken: false
securityContext: {{ toJson .Values.podSecurityContext }}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/* The volumes every pod of the chart mounts: config, scratch, and the KFP token. */}}
{{- define "spo.volumes" -}}
- name: config
  configMap: {name: {{ include "spo.fullname" . }}}
- name: work
  emptyDir: {sizeLimit: 256Mi}
{{- if eq .Values.kfp.auth.mode "serviceAccountToken" }}
- name: kfp-token
  projected:
    sources:
      - serviceAccountToken: {audience: {{ .Values.kfp.auth.audience }}, expirationSeconds: 3600, path: token}
{{- else if eq .Values.kfp.auth.mode "existingSecret" }}
- name: kfp-token
  secret: {secretName: {{ .Values.kfp.auth.existingSecret }}, items: [{key: {{ .Values.kfp.auth.secretKey }}, path: token}]}
{{- end }}
{{- if eq .Values.kfp.pipelineStore "kubernetes" }}
- name: kube-api
  projected:
    sources:
      - serviceAccountToken: {expirationSeconds: 3600, path: token}
      - configMap: {name: kube-root-ca.crt, items: [{key: ca.crt, path: ca.crt}]}
      - downwardAPI: {items: [{path: namespace, fieldRef: {fieldPath: metadata.namespace}}]}
{{- end }}
{{- end }}

{{- define "spo.volumeMounts" -}}
- {name: config, mountPath: /etc/spo, readOnly: true}
- {name: work, mountPath: /work}
{{- if ne .Values.kfp.auth.mode "none" }}
- {name: kfp-token, mountPath: /var/run/secrets/kfp, readOnly: true}
{{- end }}
{{- if eq .Values.kfp.pipelineStore "kubernetes" }}
- {name: kube-api, mountPath: /var/run/secrets/kubernetes.io/serviceaccount, readOnly: true}
{{- end }}
{{- end }}

{{/* The environment every container of the chart has: a writable HOME and caches on /work. */}}
{{- define "spo.env" -}}
- {name: HOME, value: /work}
- {name: TMPDIR, value: /work}
- {name: MPLCONFIGDIR, value: /work/matplotlib}
- {name: PYTHONDONTWRITEBYTECODE, value: "1"}
{{- end }}
