package gateway

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"sigs.k8s.io/yaml"

	"github.com/sous-run/sous/integration/itest"
	"github.com/sous-run/sous/integration/ollamatest"
)

// requeueMarker in a prompt makes the engine proxy fail that prompt's first
// engine call with a 500: a retryable engine error, so the worker requeues
// the request (sous_settle_reason="engine_error") and answers it on the
// second attempt.
const requeueMarker = "requeue me once"

// TestPrometheusScrapesDashboard: a real Prometheus (Debian's prometheus
// package, the server beside promtool) scrapes a running worker and gateway
// while requests go through both: chat and streamed chat through the
// gateway (its timestamp_in_ms gives the millisecond queue time), one
// request requeued once by an engine error, one dead-lettered as bad input.
// Then every query of deploy/monitoring's dashboard returns at least one
// series, and every alert rule of rules.yaml (loaded by that Prometheus)
// parses and evaluates without error; alerts may be empty. The one panel
// allowed to be empty is free GPU memory, and only where the worker logged
// that it has no GPU to read.
func TestPrometheusScrapesDashboard(t *testing.T) {
	t.Parallel()
	prom, err := exec.LookPath("prometheus")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("CI=true and no prometheus server: scripts/ensure-promtool.sh installs Debian's prometheus package")
		}
		t.Skip("no prometheus server (scripts/ensure-promtool.sh installs Debian's prometheus package)")
	}
	panels := dashboardQueries(t)
	rules := alertRules(t)

	q := queueName(t, "")
	engine := failOnce(t, ollama.URL())
	w := startWorker(t, q, "SOUS_ENGINE_URL="+engine, "SOUS_MODEL="+ollamatest.ScriptedModelName,
		"SOUS_MAX_ATTEMPTS=3", "SOUS_RETRY_BACKOFF=50ms", "SOUS_RETRY_BACKOFF_MAX=200ms")
	gw := startGateway(t, q, "SOUS_MODEL="+ollamatest.ScriptedModelName)

	api := startPrometheus(t, prom, w.Addr, gw.Addr)
	// Scraped before any request, so that every counter and histogram has
	// a sample from before the requests and rate() sees them.
	waitQuery(t, api, `sum(up{job=~"sous-worker|sous-gateway"})`, 3*time.Minute, func(v float64) bool { return v == 2 })

	// Round one, then round two once Prometheus holds round one's series: a
	// histogram series first appears already counting its first request, so
	// it takes a later request for its rate to be more than zero.
	for round := 1; round <= 2; round++ {
		chat(t, gw.api, fmt.Sprintf("hello, round %d", round), false)
		chat(t, gw.api, fmt.Sprintf("stream, round %d", round), true)
		if round == 1 {
			chat(t, gw.api, requeueMarker, false)
			publishBadInput(t, q)
			waitQuery(t, api, `sum(sous_dead_letters_total{sous_settle_reason!~"max_attempts|model_not_found"}) + sum(sous_messages_settled_total{sous_settle_action="requeue",sous_settle_reason="engine_error"}) + sum(sous_engine_time_to_first_token_seconds_count) + sum(sous_queue_time_seconds_count{sous_time_resolution="ms"})`,
				3*time.Minute, func(v float64) bool { return v >= 4 })
		}
	}

	noGPU := strings.Contains(w.Logs(), "no GPU memory readings")
	var empty, got []string
	if !eventually(3*time.Minute, time.Second, func() bool {
		empty, got = empty[:0], got[:0]
		for _, p := range panels {
			res, err := query(api, p.expr)
			if err != nil {
				t.Fatalf("panel %q: %s: %v", p.title, p.expr, err)
			}
			got = append(got, fmt.Sprintf("%-40s %d series  %s", p.title, len(res), p.expr))
			if len(res) == 0 && !(noGPU && strings.Contains(p.expr, "sous_gpu_memory_free_bytes")) {
				empty = append(empty, p.title+": "+p.expr)
			}
		}
		return len(empty) == 0
	}) {
		t.Fatalf("after 3 minutes, dashboard queries without data:\n  %s", strings.Join(empty, "\n  "))
	}
	t.Logf("dashboard queries:\n  %s", strings.Join(got, "\n  "))
	if noGPU {
		t.Log("no GPU here (the worker logged it): the free GPU memory panel was not required to have data")
	}
	for _, r := range rules {
		if _, err := query(api, r.Expr); err != nil {
			t.Errorf("alert %s: %v", r.Alert, err)
		}
	}
	// Prometheus evaluates the rules file itself: every rule ran, none failed.
	if !eventually(2*time.Minute, time.Second, func() bool {
		health, err := ruleHealth(api)
		if err != nil {
			t.Fatal(err)
		}
		if len(health) != len(rules) {
			return false
		}
		for _, h := range health {
			if h[1] != "ok" {
				if strings.HasPrefix(h[1], "err") {
					t.Fatalf("alert rule %s: %s", h[0], h[1])
				}
				return false
			}
		}
		return true
	}) {
		t.Fatal("after 2 minutes, not every alert rule of rules.yaml has been evaluated")
	}
}

// eventually polls cond every interval until it holds (true) or within has
// passed (false). Each poll here is a round of queries to Prometheus, so
// polls are spaced wider than itest.Eventually's.
func eventually(within, every time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(every)
	}
	return true
}

type panelQuery struct{ title, expr string }

// dashboardQueries returns every target expr of the dashboard's panels
// (rows' nested panels included).
func dashboardQueries(t *testing.T) []panelQuery {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "deploy", "monitoring", "grafana-dashboard.json"))
	if err != nil {
		t.Fatal(err)
	}
	type panel struct {
		Title   string  `json:"title"`
		Panels  []panel `json:"panels"`
		Targets []struct {
			Expr string `json:"expr"`
		} `json:"targets"`
	}
	var d panel
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("grafana-dashboard.json: %v", err)
	}
	var out []panelQuery
	var walk func(ps []panel)
	walk = func(ps []panel) {
		for _, p := range ps {
			for _, tg := range p.Targets {
				if tg.Expr != "" {
					out = append(out, panelQuery{p.Title, tg.Expr})
				}
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	if len(out) < 10 {
		t.Fatalf("grafana-dashboard.json: %d queries, want the dashboard's (at least 10)", len(out))
	}
	return out
}

type alertRule struct {
	Alert string `json:"alert"`
	Expr  string `json:"expr"`
}

func alertRules(t *testing.T) []alertRule {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "deploy", "monitoring", "rules.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var f struct {
		Groups []struct {
			Rules []alertRule `json:"rules"`
		} `json:"groups"`
	}
	if err := yaml.Unmarshal(b, &f); err != nil {
		t.Fatalf("rules.yaml: %v", err)
	}
	var out []alertRule
	for _, g := range f.Groups {
		out = append(out, g.Rules...)
	}
	if len(out) == 0 {
		t.Fatal("rules.yaml: no rules")
	}
	return out
}

// failOnce is a reverse proxy to the engine that answers the first
// generation call whose body holds requeueMarker with a 500.
func failOnce(t *testing.T, target string) string {
	t.Helper()
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	proxy := httputil.NewSingleHostReverseProxy(u)
	var failed atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/api/chat" || r.URL.Path == "/api/generate" {
			body, err := io.ReadAll(r.Body)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			r.Body = io.NopCloser(bytes.NewReader(body))
			if bytes.Contains(body, []byte(requeueMarker)) && failed.CompareAndSwap(false, true) {
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(http.StatusInternalServerError)
				_, _ = io.WriteString(w, `{"error":"injected by the test: fail once"}`)
				return
			}
		}
		// Full duplex: otherwise the server closes the request body when the
		// engine's answer starts, the proxy's transport, still finishing the
		// body it forwards, fails and cuts the answer short ("ReverseProxy
		// read error during body copy: use of closed network connection",
		// golang/go#40747), now and then, on a loaded machine.
		_ = http.NewResponseController(w).EnableFullDuplex()
		proxy.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return srv.URL
}

// chat sends one chat completion through the gateway and reads the whole
// answer; it fails the test unless the answer is a 200.
func chat(t *testing.T, api, content string, stream bool) {
	t.Helper()
	body, _ := json.Marshal(map[string]any{
		"model":    ollamatest.ScriptedModelName,
		"messages": []map[string]string{{"role": "user", "content": content}},
		"stream":   stream,
	})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, api+"/v1/chat/completions", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+apiKey)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("chat %q: %v", content, err)
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("chat %q (stream %v): %s %v\n%s", content, stream, resp.Status, err, out)
	}
	if stream && !bytes.Contains(out, []byte("data: [DONE]")) {
		t.Fatalf("chat %q: the stream did not end with [DONE]:\n%s", content, out)
	}
}

// publishBadInput puts a body that is not JSON on q: the worker
// dead-letters it as bad input.
func publishBadInput(t *testing.T, q string) {
	t.Helper()
	conn, err := amqp.Dial(brokerURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if err := ch.Confirm(false); err != nil {
		t.Fatal(err)
	}
	conf, err := ch.PublishWithDeferredConfirm("", q, false, false, amqp.Publishing{
		MessageId: "bad-input", ContentType: "application/json", DeliveryMode: amqp.Persistent, Body: []byte(`{"prompt":`)})
	if err != nil || !conf.Wait() {
		t.Fatalf("publish the bad input: %v", err)
	}
}

// startPrometheus runs prom on a free loopback port, with its data in a
// temporary directory, scraping the worker and the gateway every second and
// evaluating deploy/monitoring/rules.yaml; it returns the API's base URL
// once Prometheus is ready.
func startPrometheus(t *testing.T, prom, worker, gateway string) string {
	t.Helper()
	dir := t.TempDir()
	rules, err := filepath.Abs(filepath.Join("..", "..", "deploy", "monitoring", "rules.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	config := fmt.Sprintf(`global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files: [%q]
scrape_configs:
  - job_name: sous-worker
    static_configs:
      - targets: [%q]
        labels: {namespace: sous-it, pod: sous-worker-it}
  - job_name: sous-gateway
    static_configs:
      - targets: [%q]
        labels: {namespace: sous-it, pod: sous-gateway-it}
`, rules, worker, gateway)
	cfg := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(cfg, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	addr := itest.FreeAddr(t)
	var logs bytes.Buffer
	cmd := exec.Command(prom, "--config.file="+cfg, "--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+addr, "--log.level=warn")
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("prometheus log:\n%s", itest.Tail(logs.String(), 40))
		}
	})
	api := "http://" + addr
	if !eventually(2*time.Minute, 100*time.Millisecond, func() bool {
		select {
		case <-exited:
			t.Fatalf("prometheus exited:\n%s", logs.String())
		default:
		}
		resp, err := http.Get(api + "/-/ready")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}) {
		t.Fatalf("prometheus at %s not ready after 2 minutes", addr)
	}
	return api
}

// query evaluates expr now and returns its result vector; an error is
// a query Prometheus refused or could not run.
func query(api, expr string) ([]json.RawMessage, error) {
	resp, err := http.PostForm(api+"/api/v1/query", url.Values{"query": {expr}})
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var r struct {
		Status string `json:"status"`
		Error  string `json:"error"`
		Data   struct {
			ResultType string            `json:"resultType"`
			Result     []json.RawMessage `json:"result"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		return nil, fmt.Errorf("%s: %w", resp.Status, err)
	}
	if r.Status != "success" {
		return nil, fmt.Errorf("%s: %s", resp.Status, r.Error)
	}
	if r.Data.ResultType != "vector" {
		return nil, fmt.Errorf("result type %s, want vector", r.Data.ResultType)
	}
	return r.Data.Result, nil
}

// waitQuery waits until expr returns one sample whose value passes ok.
func waitQuery(t *testing.T, api, expr string, within time.Duration, ok func(float64) bool) {
	t.Helper()
	if !eventually(within, 500*time.Millisecond, func() bool {
		res, err := query(api, expr)
		if err != nil || len(res) != 1 {
			return false
		}
		var s struct {
			Value [2]any `json:"value"`
		}
		if json.Unmarshal(res[0], &s) != nil {
			return false
		}
		str, _ := s.Value[1].(string)
		var v float64
		if _, err := fmt.Sscan(str, &v); err != nil {
			return false
		}
		return ok(v)
	}) {
		t.Fatalf("after %s, no sample passes for %s", within, expr)
	}
}

// ruleHealth returns each alerting rule's name and health: "ok" once
// evaluated, "unknown" before, "err: ..." when its evaluation failed.
func ruleHealth(api string) ([][2]string, error) {
	resp, err := http.Get(api + "/api/v1/rules?type=alert")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var r struct {
		Data struct {
			Groups []struct {
				Rules []struct {
					Name      string `json:"name"`
					Health    string `json:"health"`
					LastError string `json:"lastError"`
				} `json:"rules"`
			} `json:"groups"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		return nil, err
	}
	var out [][2]string
	for _, g := range r.Data.Groups {
		for _, rule := range g.Rules {
			h := rule.Health
			if rule.LastError != "" {
				h = "err: " + rule.LastError
			}
			out = append(out, [2]string{rule.Name, h})
		}
	}
	return out, nil
}
