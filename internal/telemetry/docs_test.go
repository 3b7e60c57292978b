package telemetry_test

import (
	"bufio"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/batch"
	"github.com/sous-run/sous/internal/sizing"
	"github.com/sous-run/sous/internal/telemetry"
	"github.com/sous-run/sous/internal/worker"
)

// docsNamingMetrics are the files whose sous_* names a reader takes for
// metrics they can query.
var docsNamingMetrics = []string{"README.md", "docs/observability.md", "docs/reliability.md", "docs/benchmarks.md", "deploy/README.md"}

// scrape is one GET /metrics: the metric families (from # TYPE lines), the
// sample names (with _bucket, _total, ...) and the label names.
type scrape struct {
	families, samples, labels map[string]bool
	text                      string
}

var labelName = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="`)

func get(t *testing.T, srv *httptest.Server) scrape {
	t.Helper()
	resp, err := srv.Client().Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	s := scrape{families: map[string]bool{}, samples: map[string]bool{}, labels: map[string]bool{}}
	var text strings.Builder
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		text.WriteString(line + "\n")
		if f, ok := strings.CutPrefix(line, "# TYPE "); ok {
			s.families[strings.Fields(f)[0]] = true
			continue
		}
		if line == "" || line[0] == '#' {
			continue
		}
		name, rest, _ := strings.Cut(line, "{")
		name = strings.Fields(name)[0]
		s.samples[name] = true
		for _, m := range labelName.FindAllStringSubmatch(rest, -1) {
			s.labels[m[1]] = true
		}
	}
	s.text = text.String()
	return s
}

// TestCountersAreExportedFromStart: every counter is on /metrics at 0
// before its first event, so rate() and increase() alerts (broker
// reconnects, dead letters) see a series from the start.
func TestCountersAreExportedFromStart(t *testing.T) {
	t.Parallel()
	reader, handler, err := telemetry.NewPrometheus(false)
	if err != nil {
		t.Fatal(err)
	}
	setup(t, options{reader: reader, model: "tiny", startLater: true})
	srv := httptest.NewServer(handler)
	t.Cleanup(srv.Close)
	s := get(t, srv)
	for _, want := range []string{
		`sous_messages_received_total{messaging_destination_name="requests"`,
		`sous_messages_redelivered_total{messaging_destination_name="requests"`,
		`sous_broker_reconnects_total{messaging_destination_name="requests"`,
		`sous_results_total{`,
		`sous_messages_settled_total{`,
		`sous_dead_letters_total{`,
		`sous_engine_tokens_total{`,
	} {
		found := false
		for _, line := range strings.Split(s.text, "\n") {
			if strings.HasPrefix(line, want) && strings.HasSuffix(line, " 0") {
				found = true
				break
			}
		}
		if !found {
			t.Errorf("no %s…} 0 series before any event; the sous_ lines of /metrics:\n%s", want, sousLines(s.text))
		}
	}
}

// TestEveryDocumentedMetricIsExported reads every sous_* name in the docs
// and checks /metrics exports it (as a metric, one of its series or a
// label) once the worker has run one request; and that every sous_* metric
// /metrics exports is in docs/observability.md.
func TestEveryDocumentedMetricIsExported(t *testing.T) {
	t.Parallel()
	reader, handler, err := telemetry.NewPrometheus(false)
	if err != nil {
		t.Fatal(err)
	}
	h := setup(t, options{reader: reader, model: "tiny"})
	if err := h.obs.ObserveSizer(func() sizing.Snapshot {
		return sizing.Snapshot{Decision: sizing.Decision{Size: 4, Reason: "max"}, Ceiling: 4, FreeBytes: 1 << 30, Devices: 1, ReadAt: time.Now()}
	}); err != nil {
		t.Fatal(err)
	}
	if err := h.obs.ObserveLanes(func() []worker.LaneStat {
		return []worker.LaneStat{{Name: "interactive", Waiting: 1, InFlight: 2, OnEngine: 1}}
	}); err != nil {
		t.Fatal(err)
	}
	h.obs.EngineHealth(nil)
	h.b.Send("a", `{"prompt":"x"}`)
	waitFor(t, "the request settled", func() bool { return h.b.SettledCount() == 1 })
	h.b.Send("b", `{"prompt":"y","stream":true}`) // time to first token
	waitFor(t, "the streamed request settled", func() bool { return h.b.SettledCount() == 2 })
	srv := httptest.NewServer(handler)
	t.Cleanup(srv.Close)
	s := get(t, srv)

	name := regexp.MustCompile(`\bsous_[a-z0-9_]*[a-z0-9]`)
	documented := map[string]bool{}
	for _, doc := range docsNamingMetrics {
		f, err := os.Open(filepath.Join("..", "..", doc))
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(f)
		for n := 1; sc.Scan(); n++ {
			for _, m := range name.FindAllString(sc.Text(), -1) {
				if strings.HasPrefix(m, "sous_gateway_") {
					continue // the gateway's own metrics: internal/gateway exports them
				}
				if doc == "docs/observability.md" {
					documented[m] = true
				}
				if !s.samples[m] && !s.families[m] && !s.labels[m] {
					t.Errorf("%s:%d names %s, which /metrics does not export (neither a metric, a series nor a label); fix the doc or export it", doc, n, m)
				}
			}
		}
		f.Close()
	}
	var families []string
	for f := range s.families {
		if strings.HasPrefix(f, "sous_") {
			families = append(families, f)
		}
	}
	sort.Strings(families)
	if len(families) < 10 {
		t.Fatalf("only %d sous_* metrics on /metrics: %v", len(families), families)
	}
	for _, f := range families {
		if !documented[f] {
			t.Errorf("/metrics exports %s, but docs/observability.md does not name it; add it to the metrics table", f)
		}
	}
}

func sousLines(text string) string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if strings.HasPrefix(l, "sous_") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// listedValues are the attributes whose values the metric help and the
// docs list, with every value the code gives them. A list that misses a
// value or names one the code no longer gives fails.
var listedValues = []struct {
	metric string   // the metric whose HELP lists the values
	names  []string // the label and attribute names the docs list them after
	values []string
}{
	{"sous_batch_size", []string{"sous_batch_reason", "sous.batch.reason"}, func() []string {
		var out []string
		for _, r := range batch.Reasons {
			out = append(out, string(r))
		}
		return out
	}()},
	{"sous_batch_limit", []string{"sous_batch_limit_reason", "sous.batch.limit.reason"}, sizing.Reasons},
}

// TestListedValuesAreTheEmittedOnes: a metric's help and the docs list an
// attribute's values exactly as the code gives them (sous_batch_size's help
// once listed full, window, idle, and not slot, the one most calls carry).
func TestListedValuesAreTheEmittedOnes(t *testing.T) {
	t.Parallel()
	reader, handler, err := telemetry.NewPrometheus(false)
	if err != nil {
		t.Fatal(err)
	}
	h := setup(t, options{reader: reader, model: "tiny"})
	if err := h.obs.ObserveSizer(func() sizing.Snapshot {
		return sizing.Snapshot{Decision: sizing.Decision{Size: 4, Reason: "max"}, Ceiling: 4, ReadAt: time.Now()}
	}); err != nil {
		t.Fatal(err)
	}
	h.b.Send("a", `{"prompt":"x"}`)
	waitFor(t, "the request settled", func() bool { return h.b.SettledCount() == 1 })
	srv := httptest.NewServer(handler)
	t.Cleanup(srv.Close)
	s := get(t, srv)
	list := func(s string) []string {
		var out []string
		for v := range strings.SplitSeq(s, ",") {
			out = append(out, strings.Trim(strings.TrimSpace(v), "`"))
		}
		slices.Sort(out)
		return out
	}
	for _, lv := range listedValues {
		want := slices.Sorted(slices.Values(lv.values))
		m := regexp.MustCompile(`(?m)^# HELP ` + lv.metric + ` .*\(([a-z, ]+)\)`).FindStringSubmatch(s.text)
		if m == nil {
			t.Errorf("the help of %s lists no values in parentheses", lv.metric)
		} else if got := list(m[1]); !slices.Equal(got, want) {
			t.Errorf("the help of %s lists %v; the code gives %v", lv.metric, got, want)
		}
		for _, doc := range docsNamingMetrics {
			b, err := os.ReadFile(filepath.Join("..", "..", doc))
			if err != nil {
				t.Fatal(err)
			}
			for _, name := range lv.names {
				re := regexp.MustCompile("`" + regexp.QuoteMeta(name) + "` \\(((?:`[a-z]+`(?:, )?)+)\\)")
				for _, m := range re.FindAllStringSubmatch(string(b), -1) {
					if got := list(m[1]); !slices.Equal(got, want) {
						t.Errorf("%s lists %s as %v; the code gives %v", doc, name, got, want)
					}
				}
			}
		}
	}
	// The ceiling grows by what sizing.Sizer.Succeeded does: per call that
	// succeeds with the engine at the ceiling.
	if m := regexp.MustCompile(`(?m)^# HELP sous_batch_ceiling (.*)$`).FindStringSubmatch(s.text); m == nil || !strings.Contains(m[1], "at the ceiling") || strings.Contains(m[1], "full batches") {
		t.Errorf("sous_batch_ceiling's help does not say the ceiling grows per call that succeeds at the ceiling: %v", m)
	}
}

// TestRequestSignals: the signals an operator asked for (issue 27): time to
// first token of a streamed request, the whole wait from enqueue to the
// end of the request, queue time labelled with its timestamp's resolution;
// and no otel_scope_* label on every series unless asked for.
func TestRequestSignals(t *testing.T) {
	t.Parallel()
	for _, scope := range []bool{false, true} {
		reader, handler, err := telemetry.NewPrometheus(scope)
		if err != nil {
			t.Fatal(err)
		}
		h := setup(t, options{reader: reader, model: "tiny"})
		h.b.Send("a", `{"prompt":"x"}`)
		h.b.Send("b", `{"prompt":"y","stream":true}`)
		waitFor(t, "both requests settled", func() bool { return h.b.SettledCount() == 2 })
		srv := httptest.NewServer(handler)
		t.Cleanup(srv.Close)
		s := get(t, srv)
		if got := s.labels["otel_scope_name"]; got != scope {
			t.Errorf("NewPrometheus(%v): otel_scope_name on the series: %v", scope, got)
		}
		if scope {
			continue
		}
		for _, want := range []*regexp.Regexp{
			regexp.MustCompile(`(?m)^sous_engine_time_to_first_token_seconds_count\{gen_ai_request_model="tiny"\} 1$`),
			regexp.MustCompile(`(?m)^sous_request_duration_seconds_count\{gen_ai_request_model="tiny",sous_time_resolution="ms"\} 2$`),
			regexp.MustCompile(`(?m)^sous_queue_time_seconds_count\{messaging_destination_name="requests",sous_time_resolution="ms"\} 2$`),
		} {
			if !want.MatchString(s.text) {
				t.Errorf("no line matching %s in\n%s", want, sousLines(s.text))
			}
		}
	}
}

// The lane metrics count what each lane served and which deadlines it
// missed, labelled by lane.
func TestLaneMetrics(t *testing.T) {
	t.Parallel()
	reader, handler, err := telemetry.NewPrometheus(false)
	if err != nil {
		t.Fatal(err)
	}
	h := setup(t, options{reader: reader, model: "tiny"})
	h.b.Send("ok", `{"prompt":"x"}`)
	h.b.Send("late", `{"prompt":"x","deadline":"2020-01-01T00:00:00Z"}`)
	waitFor(t, "both settled", func() bool { return h.b.SettledCount() == 2 })
	srv := httptest.NewServer(handler)
	t.Cleanup(srv.Close)
	s := get(t, srv).text
	for _, want := range []string{
		`sous_lane_served_total{sous_lane="default"} 2`,
		`sous_lane_deadline_missed_total{sous_lane="default"} 1`,
		`sous_lane_wait_seconds_count{sous_lane="default"} 2`,
	} {
		if !strings.Contains(s, want) {
			t.Errorf("/metrics lacks %s:\n%s", want, grepLines(s, "sous_lane"))
		}
	}
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
