package gateway

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/integration/itest"
	"github.com/sous-run/sous/integration/ollamatest"
	"github.com/sous-run/sous/internal/fleet"
	"github.com/sous-run/sous/internal/pgtest"
	"github.com/sous-run/sous/internal/tinymodel"
)

const otherKey = "sk-sous-it-other-77a2"

// batchKeysFile holds apiKey (as "it") and otherKey (as "other").
func batchKeysFile(t *testing.T) string {
	t.Helper()
	var sb strings.Builder
	for name, k := range map[string]string{"it": apiKey, "other": otherKey} {
		sum := sha256.Sum256([]byte(k))
		sb.WriteString(name + " " + hex.EncodeToString(sum[:]) + "\n")
	}
	path := filepath.Join(t.TempDir(), "keys")
	if err := os.WriteFile(path, []byte(sb.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// The scripted model's questions, and the answer each gets.
var scripted = []struct{ q, a string }{
	{tinymodel.SkyQuestion, tinymodel.SkyAnswer},
	{tinymodel.QueueQuestion, tinymodel.QueueAnswer},
	{tinymodel.CountQuestion, tinymodel.CountAnswer},
	{"Tell me a story.", tinymodel.FallbackAnswer},
}

// batchInput writes n chat requests, custom_id "req-<i>", asking the
// scripted model's questions in turn.
func batchInput(t *testing.T, n int) string {
	t.Helper()
	var sb strings.Builder
	for i := range n {
		line, _ := json.Marshal(map[string]any{"custom_id": fmt.Sprintf("req-%d", i), "method": "POST", "url": "/v1/chat/completions",
			"body": map[string]any{"model": ollamatest.ScriptedModelName, "messages": []map[string]string{{"role": "user", "content": scripted[i%len(scripted)].q}}}})
		sb.Write(line)
		sb.WriteByte('\n')
	}
	path := filepath.Join(t.TempDir(), fmt.Sprintf("input-%d.jsonl", n))
	if err := os.WriteFile(path, []byte(sb.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// wantAnswer is what the scripted model answers req-<i>.
func wantAnswer(i int) string { return scripted[i%len(scripted)].a }

// batchLanes are the lanes of a batch test: batch lines go to the last.
func batchLanes(q string) string {
	return "interactive=" + q + ".interactive,bulk=" + q + ".bulk:share=0.5"
}

// startBatchWorker runs a worker with the two lanes on the scripted model.
func startBatchWorker(t *testing.T, q string, env ...string) *itest.Worker {
	t.Helper()
	return startWorker(t, q, append([]string{"SOUS_LANES=" + batchLanes(q), "SOUS_MODEL=" + ollamatest.ScriptedModelName,
		"SOUS_WORKER_ID=it-" + q + "-" + fmt.Sprint(seq.Add(1))}, env...)...)
}

// startBatchGateway runs a gateway with the Batch API on store.
func startBatchGateway(t *testing.T, q, store string, env ...string) *proc {
	t.Helper()
	return startGateway(t, q, append([]string{"SOUS_GATEWAY_DATABASE_URL=" + store, "SOUS_GATEWAY_LANES=" + batchLanes(q),
		"SOUS_GATEWAY_BATCH_RESULTS_QUEUE=" + q + ".batch.results", "SOUS_MODEL=" + ollamatest.ScriptedModelName,
		"SOUS_GATEWAY_KEYS_FILE=" + batchKeysFile(t)}, env...)...)
}

// TestBatchOpenAINodeClient: the official OpenAI Node client runs a batch
// through the gateway, the real RabbitMQ, a worker's bulk lane and the real
// Ollama's scripted model: every custom_id answered exactly once with the
// script's answer; a second key sees nothing of it; cancel; list pages.
func TestBatchOpenAINodeClient(t *testing.T) {
	t.Parallel()
	q := queueName(t, "")
	queues.Add(q+".interactive", q+".bulk", q+".interactive.dlq", q+".bulk.dlq", q+".batch.results")
	w := startBatchWorker(t, q)
	// A small window of lines out at once, so that the cancel finds most
	// of its batch still unpublished.
	gw := startBatchGateway(t, q, "sqlite:"+filepath.Join(t.TempDir(), "gw.db"), "SOUS_GATEWAY_BATCH_OUTSTANDING=8")
	const n = 60
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "node", "batch.mjs")
	cmd.Dir = "node"
	cmd.Env = append(os.Environ(), "BASE_URL="+gw.api+"/v1", "API_KEY="+apiKey, "OTHER_KEY="+otherKey,
		"INPUT="+batchInput(t, n), "CANCEL_INPUT="+batchInput(t, 2000))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("node batch.mjs: %v\nstdout:\n%s\nstderr:\n%s", err, out, itest.Tail(stderr.String(), 30))
	}
	got := map[string]map[string]any{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		var r map[string]any
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("client output %q: %v", line, err)
		}
		got[r["name"].(string)] = r
	}
	for _, name := range []string{"run", "other_key", "cancel", "list"} {
		r, ok := got[name]
		switch {
		case !ok:
			t.Errorf("%s: no result", name)
		case r["ok"] != true:
			t.Errorf("%s failed: %v", name, r)
		default:
			if name != "run" {
				t.Logf("%s: %v", name, r)
			}
		}
	}
	if run := got["run"]; run != nil {
		answers, _ := run["answers"].(map[string]any)
		ids, _ := run["custom_ids"].([]any)
		if len(ids) != n || len(answers) != n {
			t.Fatalf("%d output lines, %d distinct custom_ids; want %d", len(ids), len(answers), n)
		}
		for i := range n {
			if a := answers[fmt.Sprintf("req-%d", i)]; a != wantAnswer(i) {
				t.Errorf("req-%d: %q, want %q", i, a, wantAnswer(i))
			}
		}
		t.Logf("run: %d lines, counts %v", n, run["counts"])
	}
	// The cancel reached the worker, which answered the queued lines
	// "cancelled" without a dead letter.
	if !strings.Contains(w.Logs(), "requests cancelled by their producer") {
		t.Error("the worker never heard of the cancel")
	}
	conn, err := amqp.Dial(brokerURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if n := itest.QueueDepth(t, conn, q+".bulk.dlq"); n != 0 {
		t.Errorf("%d dead letters; a cancelled line is not one", n)
	}
	// The lines ran in the bulk lane; the gateway's metrics count batches.
	_, wm := w.GetBody("/metrics")
	if !strings.Contains(wm, `sous_lane_served_total{sous_lane="bulk"`) {
		t.Error("the worker's bulk lane served nothing")
	}
	_, gm := gw.GetBody("/metrics")
	for _, want := range []string{`sous_gateway_batches{sous_batch_status="completed"} 1`, `sous_gateway_batches{sous_batch_status="cancelled"} 1`, "sous_gateway_batch_published_total", "sous_gateway_batch_results_total"} {
		if !strings.Contains(gm, want) {
			t.Errorf("gateway /metrics has no %s", want)
		}
	}
	if strings.Contains(gw.Logs(), apiKey) || strings.Contains(gw.Logs(), otherKey) {
		t.Error("an API key is in the gateway's log")
	}
}

// client is a minimal Batch API client for the kill tests.
type client struct {
	t   *testing.T
	api string
}

func (c client) do(method, path string, body io.Reader, ctype string, out any) int {
	c.t.Helper()
	req, _ := http.NewRequest(method, c.api+path, body)
	req.Header.Set("Authorization", "Bearer "+apiKey)
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0 // a gateway being killed
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if out != nil && resp.StatusCode == 200 {
		if err := json.Unmarshal(b, out); err != nil {
			if s, ok := out.(*string); ok {
				*s = string(b)
			} else {
				c.t.Fatalf("%s %s: %v: %s", method, path, err, b)
			}
		}
	}
	return resp.StatusCode
}

type batchState struct {
	ID            string `json:"id"`
	Status        string `json:"status"`
	OutputFileID  string `json:"output_file_id"`
	ErrorFileID   string `json:"error_file_id"`
	RequestCounts struct {
		Total, Completed, Failed int
	} `json:"request_counts"`
}

func (c client) start(input string) batchState {
	c.t.Helper()
	content, err := os.ReadFile(input)
	if err != nil {
		c.t.Fatal(err)
	}
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	_ = mw.WriteField("purpose", "batch")
	fw, _ := mw.CreateFormFile("file", "input.jsonl")
	_, _ = fw.Write(content)
	_ = mw.Close()
	var f struct{ ID string }
	if st := c.do("POST", "/v1/files", &buf, mw.FormDataContentType(), &f); st != 200 {
		c.t.Fatalf("upload: %d", st)
	}
	var b batchState
	body := fmt.Sprintf(`{"input_file_id":%q,"endpoint":"/v1/chat/completions","completion_window":"24h"}`, f.ID)
	if st := c.do("POST", "/v1/batches", strings.NewReader(body), "application/json", &b); st != 200 {
		c.t.Fatalf("create: %d", st)
	}
	return b
}

func (c client) get(id string) batchState {
	var b batchState
	c.do("GET", "/v1/batches/"+id, nil, "", &b)
	return b
}

// checkOutput reads the output file: every custom_id of n exactly once,
// with the script's answer.
func (c client) checkOutput(b batchState, n int) {
	c.t.Helper()
	var text string
	if st := c.do("GET", "/v1/files/"+b.OutputFileID+"/content", nil, "", &text); st != 200 {
		c.t.Fatalf("output file: %d", st)
	}
	seen := map[string]bool{}
	for _, l := range strings.Split(strings.TrimSpace(text), "\n") {
		var o struct {
			CustomID string `json:"custom_id"`
			Response struct {
				StatusCode int `json:"status_code"`
				Body       struct {
					Choices []struct{ Message struct{ Content string } } `json:"choices"`
				} `json:"body"`
			} `json:"response"`
		}
		if err := json.Unmarshal([]byte(l), &o); err != nil {
			c.t.Fatalf("output line %q: %v", l, err)
		}
		if seen[o.CustomID] {
			c.t.Errorf("%s answered twice", o.CustomID)
		}
		seen[o.CustomID] = true
		var i int
		fmt.Sscanf(o.CustomID, "req-%d", &i)
		if len(o.Response.Body.Choices) != 1 || o.Response.Body.Choices[0].Message.Content != wantAnswer(i) {
			c.t.Errorf("%s: %+v, want %q", o.CustomID, o.Response, wantAnswer(i))
		}
	}
	if len(seen) != n {
		c.t.Errorf("%d custom_ids answered, want %d", len(seen), n)
	}
}

// killMidBatch runs a batch of n, kills a gateway and the worker once a
// third is done, starts them again, and checks the batch completes with
// every line once. gateways starts the gateway replicas (the first is
// killed); the client talks to the last one.
func killMidBatch(t *testing.T, q string, n int, gateways func() []*proc) {
	t.Helper()
	w := startBatchWorker(t, q)
	gws := gateways()
	c := client{t: t, api: gws[len(gws)-1].api}
	demands := listenDemands(t, q+".bulk")
	b := c.start(batchInput(t, n))
	// The publisher tells the scaler what the batch still needs, by its
	// deadline (fleet.Demand on sous.reports).
	select {
	case d := <-demands:
		t.Logf("demand for the scaler: %+v", d.Due)
	case <-time.After(time.Minute):
		t.Fatal("no demand report for the batch's queue within a minute")
	}
	start := time.Now()
	itest.WaitUntil(t, 3*time.Minute, "a third of the batch done", func() bool {
		return c.get(b.ID).RequestCounts.Completed >= n/3
	})
	mid := c.get(b.ID).RequestCounts.Completed
	gws[0].Kill()
	w.Kill()
	t.Logf("killed gateway %d and the worker at %d/%d done", gws[0].Pid(), mid, n)
	startBatchWorker(t, q)
	if len(gws) == 1 { // the only gateway: start it again on the same store
		gws = gateways()
		c.api = gws[0].api
	}
	itest.WaitUntil(t, 4*time.Minute, "the batch completed", func() bool {
		return c.get(b.ID).Status == "completed"
	})
	b = c.get(b.ID)
	t.Logf("completed in %s: %+v", time.Since(start).Round(time.Millisecond), b.RequestCounts)
	if b.RequestCounts.Total != n || b.RequestCounts.Completed != n || b.RequestCounts.Failed != 0 || b.ErrorFileID != "" {
		t.Fatalf("counts %+v, error file %q", b.RequestCounts, b.ErrorFileID)
	}
	c.checkOutput(b, n)
	dups := 0
	for _, g := range gws {
		dups += strings.Count(g.Logs(), "duplicate batch results ignored")
	}
	t.Logf("gateway log lines about duplicates ignored: %d", dups)
}

// TestBatchSurvivesKillsEmbedded: one gateway on the embedded store, killed
// (SIGKILL) with the worker mid-batch and started again on the same file.
func TestBatchSurvivesKillsEmbedded(t *testing.T) {
	t.Parallel()
	q := queueName(t, "")
	queues.Add(q+".interactive", q+".bulk", q+".interactive.dlq", q+".bulk.dlq", q+".batch.results")
	store := "sqlite:" + filepath.Join(t.TempDir(), "gw.db")
	killMidBatch(t, q, 300, func() []*proc {
		return []*proc{startBatchGateway(t, q, store, "SOUS_GATEWAY_BATCH_OUTSTANDING=40")}
	})
}

// TestBatchSurvivesKillsPostgres: two gateway replicas on one PostgreSQL
// (a private server started by the test); the first, which took the
// publisher's lease, is killed with the worker mid-batch, and the other
// finishes the batch.
func TestBatchSurvivesKillsPostgres(t *testing.T) {
	t.Parallel()
	q := queueName(t, "")
	queues.Add(q+".interactive", q+".bulk", q+".interactive.dlq", q+".bulk.dlq", q+".batch.results")
	url := pgtest.Start(t)
	killMidBatch(t, q, 300, func() []*proc {
		first := startBatchGateway(t, q, url, "SOUS_GATEWAY_BATCH_OUTSTANDING=40")
		itest.WaitUntil(t, time.Minute, "the first gateway to take the lease", func() bool {
			return strings.Contains(first.Logs(), "this gateway now publishes batch lines")
		})
		return []*proc{first, startBatchGateway(t, q, url, "SOUS_GATEWAY_BATCH_OUTSTANDING=40")}
	})
}

// TestSousctlBatch: `sousctl batch create -wait` against the real gateway
// uploads, watches and downloads; the output file answers every line once.
func TestSousctlBatch(t *testing.T) {
	t.Parallel()
	q := queueName(t, "")
	queues.Add(q+".interactive", q+".bulk", q+".interactive.dlq", q+".bulk.dlq", q+".batch.results")
	startBatchWorker(t, q)
	gw := startBatchGateway(t, q, "sqlite:"+filepath.Join(t.TempDir(), "gw.db"))
	const n = 40
	out := filepath.Join(t.TempDir(), "out.jsonl")
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "sousctl"), "batch", "create", "-f", batchInput(t, n), "-wait", "-every", "100ms", "-o", out)
	cmd.Env = append(os.Environ(), "SOUS_GATEWAY_URL="+gw.api, "SOUS_API_KEY="+apiKey)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	stdout, err := cmd.Output()
	if err != nil {
		t.Fatalf("sousctl batch create -wait: %v\n%s\n%s", err, stdout, itest.Tail(stderr.String(), 20))
	}
	if strings.Contains(stderr.String()+string(stdout), apiKey) {
		t.Error("sousctl printed the key")
	}
	id := strings.TrimSpace(string(stdout))
	c := client{t: t, api: gw.api}
	b := c.get(id)
	if b.Status != "completed" {
		t.Fatalf("batch %q: %+v", id, b)
	}
	text, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	var direct string
	c.do("GET", "/v1/files/"+b.OutputFileID+"/content", nil, "", &direct)
	if string(text) != direct {
		t.Fatal("sousctl's download differs from the output file")
	}
	c.checkOutput(b, n)
}

// TestBatchCancelTakesQueuedLinesOut: a cancel stops publishing, and the
// lines already queued are taken out without running: every worker hears
// the cancel and answers them "cancelled" (acked, not dead-lettered); the
// line on the engine finishes and is kept.
func TestBatchCancelTakesQueuedLinesOut(t *testing.T) {
	t.Parallel()
	q := queueName(t, "")
	queues.Add(q+".interactive", q+".bulk", q+".interactive.dlq", q+".bulk.dlq", q+".batch.results")
	// One slot, and answers long enough that most lines are still queued
	// (in the broker or in the worker) when the cancel comes.
	w := startBatchWorker(t, q, "SOUS_ENGINE_PARALLEL=1")
	gw := startBatchGateway(t, q, "sqlite:"+filepath.Join(t.TempDir(), "gw.db"), "SOUS_GATEWAY_BATCH_OUTSTANDING=100")
	const n = 100
	var sb strings.Builder
	for i := range n {
		fmt.Fprintf(&sb, `{"custom_id":"req-%d","method":"POST","url":"/v1/chat/completions","body":{"model":%q,"max_tokens":300,"messages":[{"role":"user","content":"Tell me a story"}]}}`+"\n", i, ollamatest.EndlessModelName)
	}
	input := filepath.Join(t.TempDir(), "input.jsonl")
	if err := os.WriteFile(input, []byte(sb.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	c := client{t: t, api: gw.api}
	b := c.start(input)
	conn, err := amqp.Dial(brokerURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	itest.WaitUntil(t, 2*time.Minute, "the lines queued", func() bool { return itest.QueueDepth(t, conn, q+".bulk") >= n/2 })
	if st := c.do("POST", "/v1/batches/"+b.ID+"/cancel", nil, "", nil); st != 200 {
		t.Fatalf("cancel: %d", st)
	}
	itest.WaitUntil(t, 3*time.Minute, "the batch cancelled", func() bool { return c.get(b.ID).Status == "cancelled" })
	b = c.get(b.ID)
	t.Logf("cancelled: %+v", b.RequestCounts)
	if b.RequestCounts.Total != n || b.RequestCounts.Completed+b.RequestCounts.Failed != n || b.RequestCounts.Completed >= n/2 {
		t.Fatalf("counts %+v: most lines should have been taken out unrun", b.RequestCounts)
	}
	var text string
	if st := c.do("GET", "/v1/files/"+b.ErrorFileID+"/content", nil, "", &text); st != 200 {
		t.Fatalf("error file: %d", st)
	}
	for _, l := range strings.Split(strings.TrimSpace(text), "\n") {
		if !strings.Contains(l, `"code":"batch_cancelled"`) {
			t.Fatalf("error line %s", l)
		}
	}
	if !strings.Contains(w.Logs(), "requests cancelled by their producer") {
		t.Error("the worker never heard of the cancel")
	}
	if d := itest.QueueDepth(t, conn, q+".bulk") + itest.QueueDepth(t, conn, q+".bulk.dlq"); d != 0 {
		t.Errorf("%d messages left in the bulk queue and its dead-letter queue", d)
	}
}

// listenDemands returns the demand reports for queue that ask for work,
// from a queue of the test's own bound to the reports exchange.
func listenDemands(t *testing.T, queue string) <-chan fleet.Demand {
	t.Helper()
	conn, err := amqp.Dial(brokerURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if err := ch.ExchangeDeclare(fleet.Exchange, amqp.ExchangeFanout, true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	rq, err := ch.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind(rq.Name, "", fleet.Exchange, false, nil); err != nil {
		t.Fatal(err)
	}
	ds, err := ch.Consume(rq.Name, "", true, true, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	out := make(chan fleet.Demand, 1)
	go func() {
		for d := range ds {
			if !fleet.IsDemand(d.Body) {
				continue
			}
			dm, err := fleet.DecodeDemand(d.Body)
			if err == nil && dm.Queue == queue && len(dm.Due) > 0 && dm.Due[0].Requests > 0 {
				select {
				case out <- dm:
				default:
				}
			}
		}
	}()
	return out
}
