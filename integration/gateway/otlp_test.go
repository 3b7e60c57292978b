package gateway

import (
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	colmetricpb "go.opentelemetry.io/proto/otlp/collector/metrics/v1"
	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	metricpb "go.opentelemetry.io/proto/otlp/metrics/v1"
	"google.golang.org/protobuf/proto"

	"github.com/sous-run/sous/integration/itest"
	"github.com/sous-run/sous/integration/ollamatest"
)

// otlpReceiver is a stand-in OpenTelemetry collector: it decodes OTLP/HTTP
// protobuf exports of metrics and traces, and keeps every attribute it
// saw (resource, scope, data point, span, event) and the raw bodies.
type otlpReceiver struct {
	*httptest.Server
	mu      sync.Mutex
	metrics map[string]*metricpb.Metric // by name, the latest export
	service string
	attrs   []string // "key=value"
	spans   int
	raw     [][]byte
}

func newOTLPReceiver(t *testing.T) *otlpReceiver {
	t.Helper()
	o := &otlpReceiver{metrics: map[string]*metricpb.Metric{}}
	o.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var body io.Reader = r.Body
		if r.Header.Get("Content-Encoding") == "gzip" {
			gz, err := gzip.NewReader(r.Body)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			body = gz
		}
		raw, err := io.ReadAll(body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		var resp proto.Message
		switch r.URL.Path {
		case "/v1/metrics":
			var req colmetricpb.ExportMetricsServiceRequest
			if err := proto.Unmarshal(raw, &req); err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			o.addMetrics(&req)
			resp = &colmetricpb.ExportMetricsServiceResponse{}
		case "/v1/traces":
			var req coltracepb.ExportTraceServiceRequest
			if err := proto.Unmarshal(raw, &req); err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			o.addSpans(&req)
			resp = &coltracepb.ExportTraceServiceResponse{}
		default:
			http.NotFound(w, r)
			return
		}
		o.mu.Lock()
		o.raw = append(o.raw, raw)
		o.mu.Unlock()
		out, _ := proto.Marshal(resp)
		w.Header().Set("Content-Type", "application/x-protobuf")
		_, _ = w.Write(out)
	}))
	t.Cleanup(o.Close)
	return o
}

func (o *otlpReceiver) keep(kvs []*commonpb.KeyValue) {
	for _, kv := range kvs {
		o.attrs = append(o.attrs, kv.Key+"="+anyString(kv.GetValue()))
	}
}

// anyString prints an attribute's value.
func anyString(v *commonpb.AnyValue) string {
	switch x := v.GetValue().(type) {
	case *commonpb.AnyValue_StringValue:
		return x.StringValue
	case *commonpb.AnyValue_IntValue:
		return fmt.Sprint(x.IntValue)
	case *commonpb.AnyValue_BoolValue:
		return fmt.Sprint(x.BoolValue)
	case *commonpb.AnyValue_DoubleValue:
		return fmt.Sprint(x.DoubleValue)
	}
	return v.String()
}

func (o *otlpReceiver) addMetrics(req *colmetricpb.ExportMetricsServiceRequest) {
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, rm := range req.ResourceMetrics {
		o.keep(rm.GetResource().GetAttributes())
		for _, kv := range rm.GetResource().GetAttributes() {
			if kv.Key == "service.name" {
				o.service = kv.GetValue().GetStringValue()
			}
		}
		for _, sm := range rm.ScopeMetrics {
			o.keep(sm.GetScope().GetAttributes())
			for _, m := range sm.Metrics {
				o.metrics[m.Name] = m
				for _, p := range m.GetSum().GetDataPoints() {
					o.keep(p.Attributes)
				}
				for _, p := range m.GetHistogram().GetDataPoints() {
					o.keep(p.Attributes)
				}
				for _, p := range m.GetGauge().GetDataPoints() {
					o.keep(p.Attributes)
				}
			}
		}
	}
}

func (o *otlpReceiver) addSpans(req *coltracepb.ExportTraceServiceRequest) {
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, rs := range req.ResourceSpans {
		o.keep(rs.GetResource().GetAttributes())
		for _, ss := range rs.ScopeSpans {
			for _, s := range ss.Spans {
				o.spans++
				o.keep(s.Attributes)
				for _, e := range s.Events {
					o.keep(e.Attributes)
				}
			}
		}
	}
}

// requests sums sous.gateway.requests over the data points whose
// attributes hold every want ("key=value").
func (o *otlpReceiver) requests(want ...string) int64 {
	o.mu.Lock()
	defer o.mu.Unlock()
	var n int64
	for _, p := range o.metrics["sous.gateway.requests"].GetSum().GetDataPoints() {
		have := map[string]bool{}
		for _, kv := range p.Attributes {
			have[kv.Key+"="+anyString(kv.GetValue())] = true
		}
		ok := true
		for _, w := range want {
			ok = ok && have[w]
		}
		if ok {
			n += p.GetAsInt()
		}
	}
	return n
}

// TestOTLPExport: the gateway exports its metrics (and spans) over
// OTLP/HTTP, like the worker, to a receiver that decodes the protobuf;
// no API key, its hash or its name is in any exported attribute or body.
func TestOTLPExport(t *testing.T) {
	t.Parallel()
	o := newOTLPReceiver(t)
	q := queueName(t, "")
	startWorker(t, q)
	gw := startGateway(t, q, "OTEL_EXPORTER_OTLP_ENDPOINT="+o.URL, "OTEL_METRIC_EXPORT_INTERVAL=200", "OTEL_BSP_SCHEDULE_DELAY=100")

	if resp := postChat(t, gw.api, `{"model":"`+ollamatest.ModelName+`","messages":[{"role":"user","content":"hi"}],"max_tokens":4}`); resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("chat: %d %s", resp.StatusCode, b)
	}
	if resp := postChat(t, gw.api, `{"model":"no-such-model","messages":[{"role":"user","content":"hi"}]}`); resp.StatusCode != http.StatusNotFound {
		t.Fatalf("unknown model: %d", resp.StatusCode)
	}
	req, _ := http.NewRequest(http.MethodGet, gw.api+"/v1/models", nil)
	req.Header.Set("Authorization", "Bearer sk-wrong-key-0000")
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("wrong key: %v %v", resp, err)
	} else {
		resp.Body.Close()
	}

	itest.WaitUntil(t, 30*time.Second, "the three requests exported over OTLP", func() bool {
		return o.requests("http.route=/v1/chat/completions", "http.response.status_code=200") == 1 &&
			o.requests("error.type=model_not_found") == 1 && o.requests("http.response.status_code=401") == 1
	})
	itest.WaitUntil(t, 30*time.Second, "the producer span exported", func() bool {
		o.mu.Lock()
		defer o.mu.Unlock()
		return o.spans > 0
	})
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.service != "sous-gateway" {
		t.Errorf("service.name %q, want sous-gateway", o.service)
	}
	for _, name := range []string{"sous.gateway.requests", "sous.gateway.request.duration", "sous.gateway.open_requests", "sous.gateway.late_replies"} {
		if o.metrics[name] == nil {
			t.Errorf("%s was not exported", name)
		}
	}
	sum := sha256.Sum256([]byte(apiKey))
	secrets := []string{apiKey, hex.EncodeToString(sum[:]), "sk-wrong-key-0000"}
	for _, a := range o.attrs {
		k, v, _ := strings.Cut(a, "=")
		if strings.Contains(strings.ToLower(k), "key") || v == "it" { // "it" is the key's name in the keys file
			t.Errorf("exported attribute %s names a key", a)
		}
	}
	for _, raw := range o.raw {
		for _, s := range secrets {
			if bytes.Contains(raw, []byte(s)) {
				t.Errorf("an OTLP export holds the secret %q", s)
			}
		}
	}
}
