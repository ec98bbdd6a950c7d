{{/* Names. */}}
{{- define "map.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "map.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Standard labels (app.kubernetes.io/*). */}}
{{- define "map.selectorLabels" -}}
app.kubernetes.io/name: {{ include "map.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "map.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "map.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: auth-proxy
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "map.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "map.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The chart's own Secret holds what is generated: TOKEN_HASH_KEY unless
an existing Secret provides it, REDIS_PASSWORD when asked to generate one. */}}
{{- define "map.ownSecret" -}}
{{- or (not .Values.tokenHashKey.existingSecret) (and .Values.redis.password.generate (not .Values.redis.password.existingSecret)) -}}
{{- end -}}

{{/* "auto", true or false against a CRD: whether to render an object of it. */}}
{{- define "map.wanted" -}}
{{- $enabled := index . 0 -}}{{- $caps := index . 1 -}}{{- $gvk := index . 2 -}}
{{- if eq (toString $enabled) "auto" -}}
{{- $caps.APIVersions.Has $gvk -}}
{{- else -}}
{{- $enabled -}}
{{- end -}}
{{- end -}}

{{/* GOMEMLIMIT: config.goMemLimit, or 80% of resources.limits.memory in MiB,
so the Go GC works harder before the kernel OOM-kills. */}}
{{- define "map.goMemLimit" -}}
{{- if .Values.config.goMemLimit -}}
{{- .Values.config.goMemLimit -}}
{{- else -}}
{{- $mem := toString (dig "limits" "memory" "" .Values.resources) -}}
{{- $mib := 0 -}}
{{- if hasSuffix "Gi" $mem -}}{{- $mib = mul (trimSuffix "Gi" $mem | atoi) 1024 -}}
{{- else if hasSuffix "Mi" $mem -}}{{- $mib = trimSuffix "Mi" $mem | atoi -}}
{{- else if hasSuffix "Ki" $mem -}}{{- $mib = div (trimSuffix "Ki" $mem | atoi) 1024 -}}
{{- else if regexMatch "^[0-9]+$" $mem -}}{{- $mib = div (atoi $mem) 1048576 -}}
{{- else if $mem -}}{{- fail (printf "resources.limits.memory %q: write it in Ki, Mi or Gi (e.g. 256Mi) so the chart can derive GOMEMLIMIT, or set config.goMemLimit" $mem) -}}
{{- end -}}
{{- if gt (int $mib) 0 -}}{{- printf "%dMiB" (div (mul $mib 4) 5) -}}{{- end -}}
{{- end -}}
{{- end -}}

{{/* Checks the schema cannot express; each message names the value. */}}
{{- define "map.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.redis.url) -}}
{{- fail (printf "replicaCount is %d but redis.url is empty: replicas would not share invalidations, so a token revoked through one replica would stay valid in the others for up to config.cacheTTL (%s). Set redis.url, or replicaCount: 1." (int .Values.replicaCount) .Values.config.cacheTTL) -}}
{{- end -}}
{{- if and .Values.redis.url (not (regexMatch "^rediss?://[^/]+" .Values.redis.url)) -}}
{{- fail "redis.url is not a redis:// or rediss:// URL with a host (its value is not shown: it may carry a password)" -}}
{{- end -}}
{{- if and .Values.redis.password.existingSecret .Values.redis.password.generate -}}
{{- fail "redis.password: set existingSecret or generate, not both" -}}
{{- end -}}
{{- if and .Values.mas.secret.existingSecret (not .Values.mas.secret.existingSecretKey) -}}
{{- fail "mas.secret.existingSecretKey: name the key of mas.secret.existingSecret that holds MAS's matrix.secret" -}}
{{- end -}}
{{- if and .Values.mas.introspectionURL (not .Values.mas.secret.existingSecret) -}}
{{- fail "mas.introspectionURL needs mas.secret.existingSecret: the proxy authenticates to MAS with matrix.secret" -}}
{{- end -}}
{{- if and .Values.trustedProxies .Values.networkPolicy.enabled (not .Values.networkPolicy.clientFrom) -}}
{{- fail "trustedProxies is set but networkPolicy.clientFrom is empty: any pod could reach the client port with an X-Forwarded-For of its choosing and pick its own rate-limit bucket; name the ingress controller's pods or namespace in networkPolicy.clientFrom" -}}
{{- end -}}
{{- if ne .Values.service.type "ClusterIP" -}}
{{- fail (printf "service.type %s would expose the admin port (/metrics) and the forward-auth port outside the cluster: keep the Service ClusterIP and expose the client port with an Ingress" .Values.service.type) -}}
{{- end -}}
{{- with .Values.config.authPort -}}
{{- if or (eq (int .) (int $.Values.config.listenPort)) (eq (int .) (int $.Values.config.adminPort)) -}}
{{- fail "config.authPort equals config.listenPort or config.adminPort: the forward-auth endpoint needs its own port" -}}
{{- end -}}
{{- end -}}
{{- if eq (int .Values.config.listenPort) (int .Values.config.adminPort) -}}
{{- fail "config.adminPort equals config.listenPort: metrics must never be served to clients" -}}
{{- end -}}
{{- end -}}

{{/* The helm test pod: its own name label, so that neither the Service nor
the NetworkPolicy's podSelector take it for a proxy. */}}
{{- define "map.testLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "map.name" . }}-test
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: test
{{- end -}}

{{/* Seconds in a Go duration (the schema admits only Go syntax). */}}
{{- define "map.seconds" -}}
{{- $total := 0.0 -}}
{{- $unit := dict "ns" 1e-9 "us" 1e-6 "µs" 1e-6 "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0 -}}
{{- range regexFindAll "[0-9.]+(ns|us|µs|ms|s|m|h)" (toString .) -1 -}}
{{- $n := regexFind "^[0-9.]+" . -}}
{{- $total = addf $total (mulf (float64 $n) (get $unit (trimPrefix $n .))) -}}
{{- end -}}
{{- $total -}}
{{- end -}}

{{/* terminationGracePeriodSeconds: the value, or SHUTDOWN_DELAY +
SHUTDOWN_TIMEOUT + 5s; a value not above the sum fails the render. */}}
{{- define "map.grace" -}}
{{- $need := addf (include "map.seconds" .Values.config.shutdownDelay | float64) (include "map.seconds" .Values.config.shutdownTimeout | float64) -}}
{{- with .Values.terminationGracePeriodSeconds -}}
{{- if le (float64 .) $need -}}
{{- fail (printf "terminationGracePeriodSeconds %v must exceed config.shutdownDelay + config.shutdownTimeout (%vs), or the kubelet kills in-flight requests" . $need) -}}
{{- end -}}
{{- . -}}
{{- else -}}
{{- add (ceil $need | int) 5 -}}
{{- end -}}
{{- end -}}
