{{/* Names, labels and the values that several templates share. */}}

{{- define "mailflow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-<chart>, or the release name alone when it already contains the chart name. */}}
{{- define "mailflow.fullname" -}}
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

{{/* Room is left for the suffixes (-operator, -relay-headless) and the pod ordinal. */}}
{{- define "mailflow.operator.fullname" -}}
{{- printf "%s-operator" (include "mailflow.fullname" . | trunc 45 | trimSuffix "-") }}
{{- end }}
{{- define "mailflow.relay.fullname" -}}
{{- printf "%s-relay" (include "mailflow.fullname" . | trunc 45 | trimSuffix "-") }}
{{- end }}
{{- define "mailflow.relay.headless" -}}
{{- printf "%s-headless" (include "mailflow.relay.fullname" .) }}
{{- end }}

{{- define "mailflow.routingSecret" -}}
{{- default (printf "%s-routing" (include "mailflow.fullname" .)) .Values.routing.secretName }}
{{- end }}

{{- define "mailflow.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "mailflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mailflow
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: operator, relay or helm-test. */}}
{{- define "mailflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mailflow.name" .context }}
app.kubernetes.io/instance: {{ .context.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The relays' log format: relay.logFormat, else the top-level logFormat. */}}
{{- define "mailflow.relay.logFormat" -}}
{{- default .Values.logFormat .Values.relay.logFormat }}
{{- end }}

{{- define "mailflow.relay.selector" -}}
{{- printf "app.kubernetes.io/name=%s,app.kubernetes.io/instance=%s,app.kubernetes.io/component=relay" (include "mailflow.name" .) .Release.Name }}
{{- end }}

{{- define "mailflow.image" -}}
{{- $tag := default .context.Chart.AppVersion .image.tag }}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{- define "mailflow.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "mailflow.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mailflow.relay.serviceAccountName" -}}
{{- if .Values.relay.serviceAccount.create }}
{{- default (include "mailflow.relay.fullname" .) .Values.relay.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.relay.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Namespaces the operator reconciles: the configured ones, or the release namespace. */}}
{{- define "mailflow.operator.namespaces" -}}
{{- $namespaces := .Values.operator.watchNamespaces | default (list .Release.Namespace) }}
{{- toJson (uniq $namespaces) }}
{{- end }}

{{/*
The most relay pods there can be: the HPA's maximum, or the fixed replica count. The relay's
Role lists their names (a StatefulSet's pods are <name>-0 .. <name>-N-1) as resourceNames.
*/}}
{{- define "mailflow.relay.maxPods" -}}
{{- if .Values.relay.autoscaling.enabled }}
{{- max .Values.relay.autoscaling.maxReplicas .Values.relay.replicas }}
{{- else }}
{{- .Values.relay.replicas }}
{{- end }}
{{- end }}

{{/* The validating webhook: its Service, certificate Secret and cluster-scoped configuration. */}}
{{- define "mailflow.webhook.service" -}}
{{- printf "%s-webhook" (include "mailflow.operator.fullname" .) }}
{{- end }}
{{- define "mailflow.webhook.secret" -}}
{{- default (printf "%s-webhook-tls" (include "mailflow.operator.fullname" .)) .Values.operator.webhook.certificateSecret }}
{{- end }}
{{/* Cluster-scoped, so the release namespace is part of the name (one per release). */}}
{{- define "mailflow.webhook.configuration" -}}
{{- printf "%s-%s-webhook" .Release.Namespace (include "mailflow.operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The certificate mode of the webhook, or a render error: "cert-manager" (the chart's Certificate,
caBundle injected by cert-manager) or "secret" (an existing Secret and its CA in caBundle).
Without either, the chart refuses: the operator's self-signed certificate changes at every
start, so only kopf's managed mode (--webhook-managed) could publish its CA, and that mode
needs `create` on every ValidatingWebhookConfiguration of the cluster (RBAC cannot narrow
`create` by name) and registers a `url` with the Service's DNS name, which the API server does
not resolve (it is not a cluster DNS client).
*/}}
{{- define "mailflow.webhook.mode" -}}
{{- $wh := .Values.operator.webhook }}
{{- if $wh.certManager.issuerRef }}
{{- if not $wh.certManager.issuerRef.name }}
{{- fail "operator.webhook.certManager.issuerRef needs a name (and kind: Issuer or ClusterIssuer)" }}
{{- end }}
{{- if $wh.caBundle }}
{{- fail "operator.webhook.caBundle and operator.webhook.certManager.issuerRef exclude each other: cert-manager injects the CA" }}
{{- end }}
{{- print "cert-manager" }}
{{- else if $wh.certificateSecret }}
{{- if not $wh.caBundle }}
{{- fail (printf "operator.webhook.certificateSecret (%s) needs operator.webhook.caBundle: the base64 PEM of the CA that signed it, for the ValidatingWebhookConfiguration (or give operator.webhook.certManager.issuerRef and let cert-manager inject it)" $wh.certificateSecret) }}
{{- end }}
{{- print "secret" }}
{{- else }}
{{- fail "operator.webhook.enabled needs a certificate the API server can trust: operator.webhook.certManager.issuerRef (cert-manager), or operator.webhook.certificateSecret with operator.webhook.caBundle. The operator's self-signed certificate is not supported by the chart: it changes at every start, and publishing it (--webhook-managed) needs cluster-wide create on ValidatingWebhookConfigurations and a URL the API server cannot resolve; see docs/install.md" }}
{{- end }}
{{- end }}

{{/*
Every network the relay trusts without AUTH (its --accept-from), as JSON: relay.acceptFrom;
loopback unless relay.trustLoopback is false (only the pod's own network namespace reaches it:
the relay itself and `kubectl port-forward`, which needs the pods/portforward permission);
relay.handoff.peerCIDRs, the pod network, when hand-off or `helm test` needs it (with
relay.networkPolicy, only the relay pods and the test pod are admitted from it).
*/}}
{{- define "mailflow.relay.acceptFrom" -}}
{{- $relay := .Values.relay }}
{{- $list := $relay.acceptFrom }}
{{- if $relay.trustLoopback }}
{{- $list = concat $list (list "127.0.0.0/8" "::1/128") }}
{{- end }}
{{- if or $relay.handoff.enabled .Values.tests.enabled }}
{{- $list = concat $list $relay.handoff.peerCIDRs }}
{{- end }}
{{- toJson (uniq $list) }}
{{- end }}

{{/*
The relay's fail-closed guards, or a render error that says what to change:
- a network of prefix length 0 (0.0.0.0/0, ::/0) in what the relay trusts is an open relay:
  refused unless relay.allowOpenRelay says so (then --allow-open-relay is passed);
- an acceptFrom without the private ranges may not cover the pod network, and then a peer
  refuses the hand-off (550: the rest of a draining pod's queue waits on its retained volume)
  and so does the relay for the `helm test` pod. The chart cannot know the pod network:
  relay.handoff.peerCIDRs says it, or the two are turned off.
*/}}
{{- define "mailflow.relay.guards" -}}
{{- $relay := .Values.relay }}
{{- $trusted := include "mailflow.relay.acceptFrom" . | fromJsonArray }}
{{- range $trusted }}
{{- if and (regexMatch "/0+$" .) (not $relay.allowOpenRelay) }}
{{- fail (printf "relay.acceptFrom (or relay.handoff.peerCIDRs) contains %s: every client anywhere could relay mail through Mailflow, an open relay. Narrow it to your mail hosts' networks (clients elsewhere can use AUTH: relay.auth.existingSecret), or, if an open relay is really what you want, set relay.allowOpenRelay=true" .) }}
{{- end }}
{{- end }}
{{- $private := list "10.0.0.0/8" "172.16.0.0/12" "192.168.0.0/16" "fc00::/7" "fd00::/8" }}
{{- $coversPods := false }}
{{- range $relay.acceptFrom }}
{{- if or (has . $private) (regexMatch "/0+$" .) }}
{{- $coversPods = true }}
{{- end }}
{{- end }}
{{- if and (not $coversPods) (not $relay.handoff.peerCIDRs) }}
{{- $needs := list }}
{{- if $relay.handoff.enabled }}
{{- $needs = append $needs "the hand-off between relay pods (relay.handoff.enabled)" }}
{{- end }}
{{- if .Values.tests.enabled }}
{{- $needs = append $needs "`helm test` (tests.enabled)" }}
{{- end }}
{{- if $needs }}
{{- fail (printf "relay.acceptFrom (%s) has none of the private ranges, so the chart cannot tell that it covers the pod network, which %s sends from: the relays would refuse it (550). Set relay.handoff.peerCIDRs to your cluster's pod network (with relay.networkPolicy.enabled=true, so that only the relay pods and the test pod are admitted from it), or turn off what needs it (relay.handoff.enabled=false, tests.enabled=false)" (join ", " $relay.acceptFrom | default "empty") (join " and " $needs)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* An exec probe of a host-network relay: GET the path on its own ordinal port, through the
image's Python without site packages (a few milliseconds), failing on anything but 2xx. */}}
{{- define "mailflow.relay.hostProbe" -}}
exec:
  command:
    - python3
    - -I
    - -S
    - -c
    - {{ printf "import os, urllib.request as r; r.urlopen('http://%%s:%%d%s' %% (os.environ['MAILFLOW_PROBE_ADDRESS'], int(os.environ['MAILFLOW_HTTP_PORT']) + int(os.environ['POD_INDEX'])), timeout=3)" . | quote }}
{{- end }}
