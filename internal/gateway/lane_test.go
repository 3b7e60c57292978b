package gateway

import (
	"context"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/sous-run/sous/internal/lanes"
)

var testLanes = []lanes.Lane{{Name: "interactive", Queue: "q.interactive"}, {Name: "bulk", Queue: "q.bulk", Share: 0.2}, {Name: "batch", Queue: "q.batch", Share: 0.1}}

// postLane posts a completion with key and, when lane is not nil, an
// X-Sous-Lane header of *lane.
func postLane(t *testing.T, url, key string, lane *string) *http.Response {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, url+"/v1/completions", strings.NewReader(`{"prompt":"hi"}`))
	req.Header.Set("Content-Type", "application/json")
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	if lane != nil {
		req.Header.Set(LaneHeader, *lane)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

func ptr(s string) *string { return &s }

// Each request goes to its lane's queue: the header's lane, else the key's
// first lane, else the gateway's first; a lane the key may not use is a
// 403 and an unknown one a 400, neither naming a queue, and neither
// publishes anything.
func TestLaneChoice(t *testing.T) {
	t.Parallel()
	const (
		anyKey  = "sk-any-lane"
		bulkKey = "sk-bulk-only"
		twoKey  = "sk-bulk-then-interactive"
	)
	keys := keyLine("alice", anyKey, "") + keyLine("bob", bulkKey, "lanes=bulk") + keyLine("carol", twoKey, "rate=100 lanes=bulk,interactive")
	for _, tc := range []struct {
		name   string
		key    string
		header *string
		status int
		queue  string // published to, when 200
		code   string // error code, otherwise
		says   []string
	}{
		{"no header, a key without lanes: the first lane", anyKey, nil, 200, "q.interactive", "", nil},
		{"an empty header is no header", anyKey, ptr(""), 200, "q.interactive", "", nil},
		{"the header's lane", anyKey, ptr("bulk"), 200, "q.bulk", "", nil},
		{"the header's lane, spaces trimmed", anyKey, ptr(" batch "), 200, "q.batch", "", nil},
		{"no header: the key's default", bulkKey, nil, 200, "q.bulk", "", nil},
		{"no header: the key's first lane", twoKey, nil, 200, "q.bulk", "", nil},
		{"the header's lane, one of the key's", twoKey, ptr("interactive"), 200, "q.interactive", "", nil},
		{"a lane the key may not use", bulkKey, ptr("interactive"), 403, "", "lane_not_allowed", []string{"`interactive`", "may not use", "bulk"}},
		{"a lane the key may not use, not its default", twoKey, ptr("batch"), 403, "", "lane_not_allowed", []string{"`batch`", "bulk, interactive"}},
		{"an unknown lane", anyKey, ptr("urgent"), 400, "", "unknown_lane", []string{"`urgent`", "interactive, bulk, batch"}},
		{"an unknown lane, with a key limited to lanes", bulkKey, ptr("urgent"), 400, "", "unknown_lane", []string{"`urgent`"}},
		{"the names are case-sensitive", anyKey, ptr("Bulk"), 400, "", "unknown_lane", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv, b := setup(t, setupOpts{keys: keys, answer: okAnswer("x"), cfg: func(c *Config) { c.Lanes = testLanes }})
			resp := postLane(t, srv.URL, tc.key, tc.header)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d", resp.StatusCode, tc.status)
			}
			b.mu.Lock()
			sent := slices.Clone(b.sent)
			b.mu.Unlock()
			if tc.status == 200 {
				if len(sent) != 1 || sent[0].Queue != tc.queue {
					t.Fatalf("published %+v, want one message to %s", sent, tc.queue)
				}
				return
			}
			if len(sent) != 0 {
				t.Fatalf("a refused request was published: %+v", sent)
			}
			e := decode[errorBody](t, resp)
			if e.Error.Code == nil || *e.Error.Code != tc.code || e.Error.Type != "invalid_request_error" {
				t.Fatalf("error %+v, want code %s", e.Error, tc.code)
			}
			for _, s := range tc.says {
				if !strings.Contains(e.Error.Message, s) {
					t.Errorf("message %q does not say %q", e.Error.Message, s)
				}
			}
			if strings.Contains(e.Error.Message, "q.") {
				t.Errorf("message %q names a queue", e.Error.Message)
			}
		})
	}
}

// Lanes without keys: the header, else the first lane.
func TestLaneWithoutKeys(t *testing.T) {
	t.Parallel()
	srv, b := setup(t, setupOpts{answer: okAnswer("x"), cfg: func(c *Config) { c.Lanes = testLanes }})
	for _, tc := range []struct {
		header *string
		queue  string
	}{{nil, "q.interactive"}, {ptr("bulk"), "q.bulk"}} {
		if resp := postLane(t, srv.URL, "", tc.header); resp.StatusCode != 200 {
			t.Fatalf("%v: status %d", tc.header, resp.StatusCode)
		}
		b.mu.Lock()
		got := b.sent[len(b.sent)-1].Queue
		b.mu.Unlock()
		if got != tc.queue {
			t.Errorf("header %v: published to %s, want %s", tc.header, got, tc.queue)
		}
	}
}

// Without lanes every request goes to Queue, and an X-Sous-Lane header is
// a 400 saying so rather than being ignored.
func TestNoLanes(t *testing.T) {
	t.Parallel()
	srv, b := setup(t, setupOpts{answer: okAnswer("x")})
	if resp := postLane(t, srv.URL, "", nil); resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	if resp := postLane(t, srv.URL, "", ptr("")); resp.StatusCode != 200 {
		t.Fatalf("empty header: status %d", resp.StatusCode)
	}
	resp := postLane(t, srv.URL, "", ptr("bulk"))
	if resp.StatusCode != 400 {
		t.Fatalf("a lane without lanes: status %d, want 400", resp.StatusCode)
	}
	e := decode[errorBody](t, resp)
	if e.Error.Code == nil || *e.Error.Code != "lanes_not_configured" || !strings.Contains(e.Error.Message, "no lanes") {
		t.Fatalf("error %+v", e.Error)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.sent) != 2 || b.sent[0].Queue != "q" || b.sent[1].Queue != "q" {
		t.Fatalf("published %+v, want two messages to q", b.sent)
	}
}

// The producer span is named for the lane's queue and carries sous.lane;
// without lanes it names Queue and has no sous.lane. The requests counter
// has the lane too, bounded: a refused unknown lane has none.
func TestLaneSpanAndMetrics(t *testing.T) {
	t.Parallel()
	for _, withLanes := range []bool{true, false} {
		rec := tracetest.NewSpanRecorder()
		tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
		reader := sdkmetric.NewManualReader()
		mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
		srv, _ := setup(t, setupOpts{answer: okAnswer("x"), cfg: func(c *Config) {
			c.Tracer, c.Meter = tp.Tracer("test"), mp.Meter("test")
			if withLanes {
				c.Lanes = testLanes
			}
		}})
		var header *string
		wantName, wantQueue, wantLane := "publish q", "q", ""
		if withLanes {
			header, wantName, wantQueue, wantLane = ptr("bulk"), "publish q.bulk", "q.bulk", "bulk"
			if resp := postLane(t, srv.URL, "", ptr("urgent")); resp.StatusCode != 400 {
				t.Fatalf("unknown lane: %d", resp.StatusCode)
			}
		}
		if resp := postLane(t, srv.URL, "", header); resp.StatusCode != 200 {
			t.Fatalf("status %d", resp.StatusCode)
		}
		// The span ends, and the counter counts, after the answer is written.
		waitFor(t, func() bool { return len(rec.Ended()) > 0 })
		spans := rec.Ended()
		if len(spans) != 1 || spans[0].Name() != wantName {
			t.Fatalf("lanes %v: spans %v, want one named %q", withLanes, spans, wantName)
		}
		attrs := map[attribute.Key]string{}
		for _, kv := range spans[0].Attributes() {
			attrs[kv.Key] = kv.Value.Emit()
		}
		if attrs["messaging.destination.name"] != wantQueue || attrs["sous.lane"] != wantLane {
			t.Errorf("lanes %v: span attributes %v", withLanes, attrs)
		}
		if _, ok := attrs["sous.lane"]; ok != withLanes {
			t.Errorf("lanes %v: sous.lane present %v", withLanes, ok)
		}
		want := map[string]int64{"200/": 1}
		if withLanes {
			want = map[string]int64{"200/bulk": 1, "400/": 1}
		}
		waitFor(t, func() bool { return mapsEqual(requestsByLane(t, reader), want) })
		_ = tp.Shutdown(context.Background())
	}
}

// requestsByLane reads sous.gateway.requests by "status/lane".
func requestsByLane(t *testing.T, reader *sdkmetric.ManualReader) map[string]int64 {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	got := map[string]int64{}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name != "sous.gateway.requests" {
				continue
			}
			for _, dp := range m.Data.(metricdata.Sum[int64]).DataPoints {
				lane, _ := dp.Attributes.Value("sous.lane")
				status, _ := dp.Attributes.Value("http.response.status_code")
				got[status.Emit()+"/"+lane.Emit()] += dp.Value
			}
		}
	}
	return got
}

func mapsEqual(a, b map[string]int64) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// lanes= on a key's line: the key's lanes, its default first; a malformed
// list is refused without echoing it, and so, at load, is a lane the
// gateway does not have, or lanes= on a gateway without lanes.
func TestKeysLanes(t *testing.T) {
	t.Parallel()
	keys, err := ParseKeys([]byte(keyLine("a", "k1", "lanes=bulk,interactive models=m")+keyLine("b", "k2", "")), 0)
	if err != nil {
		t.Fatal(err)
	}
	if got := keys[0].Lanes; !slices.Equal(got, []string{"bulk", "interactive"}) || !keys[0].AllowsLane("bulk") || keys[0].AllowsLane("batch") {
		t.Fatalf("lanes %v", got)
	}
	if len(keys[1].Lanes) != 0 || !keys[1].AllowsLane("anything") {
		t.Fatalf("a key without lanes= may use every lane: %v", keys[1].Lanes)
	}
	const pasted = "sk-live-abcdefghijklmnopqrstuvwxyz0123456789"
	for _, tc := range []struct{ extra, err string }{
		{"lanes=", "lane 1 of lanes="},
		{"lanes=bulk,,a", "lane 2 of lanes="},
		{"lanes=bulk,bulk", "lane 2 of lanes="},
		{"lanes=" + pasted + "+/=", "lane 1 of lanes="},
		{"lanes=a lanes=b", "lanes= is given twice"},
	} {
		_, err := ParseKeys([]byte(keyLine("alice", "k", tc.extra)), 0)
		if err == nil || !strings.Contains(err.Error(), tc.err) || strings.Contains(err.Error(), pasted) {
			t.Errorf("%s: %v, want an error with %q that echoes nothing", tc.extra, err, tc.err)
		}
	}
	path := filepath.Join(t.TempDir(), "keys")
	for _, tc := range []struct {
		file  string
		known []string
		err   string
	}{
		{keyLine("alice", "k", "lanes=bulk"), []string{"interactive", "bulk"}, ""},
		{keyLine("alice", "k", ""), nil, ""},
		{keyLine("alice", "k", "lanes=bulk"), nil, "needs SOUS_GATEWAY_LANES"},
		{keyLine("alice", "k", "lanes=interactive,"+pasted), []string{"interactive", "bulk"}, "lane 2 of lanes= is not one of SOUS_GATEWAY_LANES's (interactive, bulk)"},
	} {
		if err := os.WriteFile(path, []byte(tc.file), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := LoadKeys(path, 0, tc.known, slog.New(slog.DiscardHandler))
		if tc.err == "" && err != nil || tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err) || strings.Contains(err.Error(), pasted)) {
			t.Errorf("%q with lanes %v: %v, want %q", tc.file, tc.known, err, tc.err)
		}
	}
}
