package integration

import (
	"compress/gzip"
	"encoding/hex"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/protobuf/proto"
)

// collector is a stand-in OpenTelemetry collector: it accepts OTLP/HTTP
// trace exports and keeps the spans with their service names.
type collector struct {
	*httptest.Server
	mu    sync.Mutex
	spans []collected
}

type collected struct {
	service string
	span    *tracepb.Span
}

func newCollector(t *testing.T) *collector {
	t.Helper()
	c := &collector{}
	c.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v1/traces" {
			w.WriteHeader(http.StatusOK) // metrics, if any, are not checked here
			return
		}
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
		var req coltracepb.ExportTraceServiceRequest
		if err == nil {
			err = proto.Unmarshal(raw, &req)
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		c.mu.Lock()
		for _, rs := range req.ResourceSpans {
			service := ""
			for _, kv := range rs.GetResource().GetAttributes() {
				if kv.Key == "service.name" {
					service = kv.GetValue().GetStringValue()
				}
			}
			for _, ss := range rs.ScopeSpans {
				for _, s := range ss.Spans {
					c.spans = append(c.spans, collected{service, s})
				}
			}
		}
		c.mu.Unlock()
		w.Header().Set("Content-Type", "application/x-protobuf")
		out, _ := proto.Marshal(&coltracepb.ExportTraceServiceResponse{})
		_, _ = w.Write(out)
	}))
	t.Cleanup(c.Close)
	return c
}

// inTrace returns the spans of trace id (hex), by service and name.
func (c *collector) inTrace(id string) map[string]*tracepb.Span {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[string]*tracepb.Span{}
	for _, s := range c.spans {
		if hex.EncodeToString(s.span.TraceId) == id {
			out[s.service+"/"+s.span.Name] = s.span
		}
	}
	return out
}

// metricValue sums the samples of a Prometheus metric whose labels contain
// every label of want (`name="value"` pairs).
func metricValue(text, name string, want ...string) float64 {
	// A series without labels has no braces (no otel_scope_* labels by
	// default).
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + `(?:\{([^}]*)\})? (\S+)$`)
	sum := 0.0
	for _, m := range re.FindAllStringSubmatch(text, -1) {
		ok := true
		for _, w := range want {
			ok = ok && strings.Contains(m[1], w)
		}
		if v, err := strconv.ParseFloat(m[2], 64); ok && err == nil {
			sum += v
		}
	}
	return sum
}

func scrape(t *testing.T, addr string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %s", resp.Status)
	}
	return string(b)
}

// TestTelemetryEndToEnd: sousctl starts a trace; the worker continues it
// and exports its spans over OTLP; producer and worker spans share the
// trace, the worker's logs carry its id, and /metrics on the worker's HTTP
// address shows the run, a broker reconnect included.
func TestTelemetryEndToEnd(t *testing.T) {
	t.Parallel()
	col := newCollector(t)
	q, _ := names(t)
	u, err := url.Parse(brokerURL)
	if err != nil {
		t.Fatal(err)
	}
	p := newProxy(t, u.Host)
	viaProxy := *u
	viaProxy.Host = p.addr
	w := startWorker(t, q, "SOUS_AMQP_URL="+viaProxy.String(),
		"OTEL_EXPORTER_OTLP_ENDPOINT="+col.URL, "OTEL_METRICS_EXPORTER=prometheus",
		"OTEL_BSP_SCHEDULE_DELAY=50", "OTEL_SERVICE_NAME=sous-it")

	var stderr strings.Builder
	cmd := exec.Command(filepath.Join(binDir, "sousctl"), "publish", "-url", brokerURL, "-queue", q, "-json", "trace me")
	cmd.Env = append(cmd.Environ(), "OTEL_EXPORTER_OTLP_ENDPOINT="+col.URL)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil || !strings.Contains(string(out), `"status":"ok"`) {
		t.Fatalf("sousctl: %v\n%s%s", err, out, stderr.String())
	}
	traceID, ok := strings.CutPrefix(strings.TrimSpace(stderr.String()), "trace_id=")
	if !ok || len(traceID) != 32 {
		t.Fatalf("sousctl stderr %q, want trace_id=<32 hex digits>", stderr.String())
	}

	want := []string{"sousctl/sousctl publish", "sousctl/publish " + q, "sous-it/process " + q, "sous-it/batch tiny", "sous-it/text_completion tiny", "sous-it/publish", "sous-it/ack " + q}
	waitUntil(t, 30*time.Second, "the spans of trace "+traceID, func() bool {
		got := col.inTrace(traceID)
		for _, n := range want {
			if got[n] == nil {
				return false
			}
		}
		return true
	})
	spans := col.inTrace(traceID)
	process, send := spans["sous-it/process "+q], spans["sousctl/publish "+q]
	if hex.EncodeToString(process.ParentSpanId) != hex.EncodeToString(send.SpanId) {
		t.Errorf("the worker's process span has parent %x, want sousctl's publish span %x", process.ParentSpanId, send.SpanId)
	}
	if process.Kind != tracepb.Span_SPAN_KIND_CONSUMER || send.Kind != tracepb.Span_SPAN_KIND_PRODUCER {
		t.Errorf("span kinds: process %v, publish %v", process.Kind, send.Kind)
	}
	if !strings.Contains(w.Logs(), "trace_id="+traceID) {
		t.Errorf("no worker log line carries trace_id=%s", traceID)
	}

	m := scrape(t, w.Addr)
	queueLabel := `messaging_destination_name="` + q + `"`
	if got := metricValue(m, "sous_messages_received_total", queueLabel); got != 1 {
		t.Errorf("sous_messages_received_total %v, want 1", got)
	}
	if got := metricValue(m, "sous_results_total", `sous_result_status="ok"`); got != 1 {
		t.Errorf("sous_results_total{ok} %v, want 1", got)
	}
	if got := metricValue(m, "sous_engine_tokens_total", `gen_ai_token_type="output"`); got < 1 {
		t.Errorf("sous_engine_tokens_total{output} %v, want some", got)
	}
	if got := metricValue(m, "sous_engine_up"); got != 1 {
		t.Errorf("sous_engine_up %v, want 1", got)
	}
	if got := metricValue(m, "sous_messages_in_flight", queueLabel); got != 0 {
		t.Errorf("sous_messages_in_flight %v, want 0", got)
	}

	p.cut()
	waitUntil(t, 60*time.Second, "a broker reconnect in /metrics", func() bool {
		return metricValue(scrape(t, w.Addr), "sous_broker_reconnects_total", queueLabel) >= 1
	})
}
