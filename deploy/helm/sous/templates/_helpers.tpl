{{/* The release's prefix: the release name when it names sous, else <release>-sous. */}}
{{- define "sous.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default "sous" .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "sous.worker" -}}{{ include "sous.fullname" . }}-worker{{- end -}}
{{- define "sous.gateway" -}}{{ include "sous.fullname" . }}-gateway{{- end -}}
{{- define "sous.scaler" -}}{{ include "sous.fullname" . }}-scaler{{- end -}}
{{- define "sous.config" -}}{{ include "sous.fullname" . }}-config{{- end -}}
{{- define "sous.models" -}}{{ default (printf "%s-models" (include "sous.fullname" .)) .Values.models.existingClaim }}{{- end -}}
{{- define "sous.serviceAccount" -}}{{ default (include "sous.worker" .) .Values.serviceAccount.name }}{{- end -}}

{{/* Selector labels of one component: include "sous.selector" (list . "worker"). */}}
{{- define "sous.selector" -}}
app.kubernetes.io/name: {{ default "sous" (index . 0).Values.nameOverride }}
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "sous.labels" -}}
{{ include "sous.selector" . }}
app.kubernetes.io/version: {{ (index . 0).Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ (index . 0).Release.Service }}
helm.sh/chart: {{ printf "%s-%s" (index . 0).Chart.Name (index . 0).Chart.Version }}
{{- end -}}

{{/* The engine preset of engine.kind; fails on an unknown kind. */}}
{{- define "sous.preset" -}}
{{- $p := index .Values.engine.presets .Values.engine.kind -}}
{{- if not $p -}}
{{- fail (printf "engine.kind %q: want one of ollama, vllm, llamacpp, external (or a preset under engine.presets)" .Values.engine.kind) -}}
{{- end -}}
{{- toYaml $p -}}
{{- end -}}

{{/* An image ref: include "sous.image" (list registry repository tag digest). */}}
{{- define "sous.image" -}}
{{- $reg := index . 0 -}}{{- $repo := index . 1 -}}{{- $tag := index . 2 -}}{{- $digest := index . 3 -}}
{{- $name := $repo -}}
{{- if $reg }}{{ $name = printf "%s/%s" (trimSuffix "/" $reg) $repo }}{{ end -}}
{{- if $digest -}}{{ printf "%s@%s" $name $digest }}{{- else -}}{{ printf "%s:%s" $name $tag }}{{- end -}}
{{- end -}}

{{- define "sous.workerImage" -}}
{{- $p := include "sous.preset" . | fromYaml -}}
{{- include "sous.image" (list .Values.image.registry (default $p.repository .Values.image.repository) (default .Chart.AppVersion .Values.image.tag) .Values.image.digest) -}}
{{- end -}}

{{- define "sous.gatewayImage" -}}
{{- $g := .Values.gateway.image -}}
{{- include "sous.image" (list (default .Values.image.registry $g.registry) $g.repository (default (default .Chart.AppVersion .Values.image.tag) $g.tag) $g.digest) -}}
{{- end -}}

{{- define "sous.scalerImage" -}}
{{- $s := .Values.scaler.image -}}
{{- include "sous.image" (list (default .Values.image.registry $s.registry) $s.repository (default (default .Chart.AppVersion .Values.image.tag) $s.tag) $s.digest) -}}
{{- end -}}

{{/*
The queues the work-aware scaler measures, comma-separated: every lane's
queue of SOUS_LANES (name=queue[:options],...), else SOUS_QUEUE.
*/}}
{{- define "sous.scalerQueues" -}}
{{- $cfg := include "sous.configData" . | fromYaml -}}
{{- $queues := list -}}
{{- if $cfg.SOUS_LANES -}}
{{- range splitList "," $cfg.SOUS_LANES -}}
{{- $name := first (splitList "=" (trim .)) -}}
{{- $queues = append $queues (first (splitList ":" (trimPrefix (printf "%s=" $name) (trim .)))) -}}
{{- end -}}
{{- else -}}
{{- $queues = list ($cfg.SOUS_QUEUE | default "sous.requests") -}}
{{- end -}}
{{- join "," $queues -}}
{{- end -}}

{{/*
The worker's ConfigMap data as YAML: the preset's env (templated with
.model and .mountPath), then SOUS_BROKER and the broker's settings, then the
non-empty config values, then extraConfig.
*/}}
{{- define "sous.configData" -}}
{{- $p := include "sous.preset" . | fromYaml -}}
{{- $model := default $p.model .Values.config.SOUS_MODEL -}}
{{- $ctx := dict "model" $model "mountPath" .Values.models.mountPath "preset" $p "Values" .Values "Release" .Release -}}
{{- $out := dict "SOUS_BROKER" .Values.broker.kind "SOUS_MODEL" $model "SOUS_MODELS_ALLOWED" $model -}}
{{- if not (has .Values.broker.kind (list "rabbitmq" "servicebus")) -}}
{{- fail (printf "broker.kind %q: want rabbitmq or servicebus" .Values.broker.kind) -}}
{{- end -}}
{{- if eq .Values.broker.kind "servicebus" -}}
{{- $_ := set $out "SOUS_SERVICEBUS_NAMESPACE" .Values.broker.servicebus.namespace -}}
{{- end -}}
{{- range $k, $v := $p.env -}}
{{- $_ := set $out $k (tpl (toString $v) $ctx) -}}
{{- end -}}
{{- range $k, $v := .Values.config -}}
{{- if not (hasPrefix "SOUS_" $k) -}}
{{- fail (printf "config.%s: config holds SOUS_* settings only; put other variables in extraConfig" $k) -}}
{{- end -}}
{{- if has $k (list "SOUS_AMQP_URL" "SOUS_SERVICEBUS_CONNECTION_STRING" "SOUS_ENGINE_API_KEY") -}}
{{- fail (printf "config.%s is a secret: it is read from a Secret (broker.rabbitmq.urlSecret, broker.servicebus.connectionStringSecret, engine.apiKeySecret), never the ConfigMap" $k) -}}
{{- end -}}
{{- if and (not (kindIs "invalid" $v)) (ne (toString $v) "") -}}
{{- $_ := set $out $k (toString $v) -}}
{{- end -}}
{{- end -}}
{{- range $k, $v := .Values.extraConfig -}}
{{- if and (not (kindIs "invalid" $v)) (ne (toString $v) "") -}}
{{- $_ := set $out $k (toString $v) -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/* The KEDA value: the worker's capacity (internal/worker.Capacity). */}}
{{- define "sous.kedaValue" -}}
{{- if .Values.keda.value -}}
{{- .Values.keda.value -}}
{{- else -}}
{{- $cfg := include "sous.configData" . | fromYaml -}}
{{- $limit := int (default "32" $cfg.SOUS_BATCH_MAX) -}}
{{- $par := toString (default "auto" $cfg.SOUS_ENGINE_PARALLEL) -}}
{{- if regexMatch "^[0-9]+$" $par -}}{{- $limit = min $limit (int $par) -}}{{- end -}}
{{- $limit = max 1 $limit -}}
{{- min 65535 (max (mul 3 $limit) (add $limit 32)) -}}
{{- end -}}
{{- end -}}
