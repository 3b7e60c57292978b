package gateway

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"mime/multipart"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/fleet"
	"github.com/sous-run/sous/internal/gateway/batchstore"
	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/lanes"
	"github.com/sous-run/sous/internal/wire"
)

// fakeBatchBroker takes published batch lines; answer (when set) makes
// each line's result at once, else the test answers them with reply.
type fakeBatchBroker struct {
	results chan Delivery
	mu      sync.Mutex
	sent    []Message
	acks    int
	nacks   int
	copies  int // results delivered per line (a redelivery repeats one)
	manual  bool
	refuse  error
	demands [][]byte
}

func (b *fakeBatchBroker) PublishDemand(_ context.Context, body []byte) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.demands = append(b.demands, body)
	return nil
}

// lastDemand is the last demand report sent, zero if none.
func (b *fakeBatchBroker) lastDemand() fleet.Demand {
	b.mu.Lock()
	defer b.mu.Unlock()
	var d fleet.Demand
	if len(b.demands) > 0 {
		_ = json.Unmarshal(b.demands[len(b.demands)-1], &d)
	}
	return d
}

func newFakeBatchBroker() *fakeBatchBroker {
	return &fakeBatchBroker{results: make(chan Delivery, 100000), copies: 1}
}

func (b *fakeBatchBroker) BatchResults() <-chan Delivery { return b.results }

func (b *fakeBatchBroker) Publish(_ context.Context, m Message) error {
	b.mu.Lock()
	if b.refuse != nil {
		defer b.mu.Unlock()
		return b.refuse
	}
	b.sent = append(b.sent, m)
	manual, copies := b.manual, b.copies
	b.mu.Unlock()
	if !manual {
		for range copies {
			b.reply(m)
		}
	}
	return nil
}

// reply answers m as the scripted worker would: the chat's last user
// message echoed, a prompt reversed, an embedding of the input's lengths.
func (b *fakeBatchBroker) reply(m Message) {
	var req wire.Request
	_ = json.Unmarshal(m.Body, &req)
	res := wire.Result{ID: req.ID, Status: wire.StatusOK, Model: req.Model, DoneReason: "stop"}
	switch {
	case len(req.Messages) > 0:
		res.Message = &inference.Message{Role: "assistant", Content: "echo: " + req.Messages[len(req.Messages)-1].Content}
	case req.Prompt != nil:
		text := "completed: " + *req.Prompt
		res.Response = &text
	default:
		var in []string
		_ = json.Unmarshal(req.Input, &in)
		for _, s := range in {
			res.Embeddings = append(res.Embeddings, []float32{float32(len(s))})
		}
	}
	if strings.Contains(string(m.Body), "please fail") {
		res = wire.Result{ID: req.ID, Status: wire.StatusError, Model: req.Model, Error: &wire.ErrorInfo{Code: "engine_rejected", Message: "engine said no at /internal/path"}}
	}
	body, _ := json.Marshal(res)
	b.results <- Delivery{CorrelationID: m.ID, Body: body,
		Ack:  func() error { b.mu.Lock(); b.acks++; b.mu.Unlock(); return nil },
		Nack: func() error { b.mu.Lock(); b.nacks++; b.mu.Unlock(); return nil }}
}

func (b *fakeBatchBroker) published() []Message {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.sent)
}

type batchEnv struct {
	srv   *httptest.Server
	br    *fakeBatchBroker
	store *batchstore.Store
	clock *fakeClock
	stop  func()
}

type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

type batchOpts struct {
	keys  string
	path  string // the SQLite file; default a new one
	br    *fakeBatchBroker
	clock *fakeClock
	cfg   func(*Config)
}

func setupBatches(t *testing.T, o batchOpts) *batchEnv {
	t.Helper()
	if o.path == "" {
		o.path = filepath.Join(t.TempDir(), "batches.db")
	}
	store, err := batchstore.Open(context.Background(), "sqlite:"+o.path)
	if err != nil {
		t.Fatal(err)
	}
	if o.br == nil {
		o.br = newFakeBatchBroker()
	}
	if o.clock == nil {
		o.clock = &fakeClock{t: time.Now()}
	}
	cfg := Config{Queue: "q", Model: "tiny", Models: []string{"tiny", "other"}, Timeout: 5 * time.Second,
		MaxBodyBytes: 4096, MaxPromptBytes: 1024, MaxNumPredict: 64, Now: o.clock.Now,
		Batch: &BatchConfig{Store: store, Lane: lanes.Lane{Name: "bulk", Queue: "q.bulk"}, Poll: 5 * time.Millisecond,
			LeaseTTL: time.Second}}
	if o.cfg != nil {
		o.cfg(&cfg)
	}
	if o.keys != "" {
		path := filepath.Join(t.TempDir(), "keys")
		if err := os.WriteFile(path, []byte(o.keys), 0o600); err != nil {
			t.Fatal(err)
		}
		k, err := LoadKeys(path, 0, nil, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		cfg.Keys = k
	}
	api := New(cfg, &fakeBroker{}, slog.New(slog.DiscardHandler))
	srv := httptest.NewServer(api)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); api.RunBatches(ctx, o.br) }()
	var once sync.Once
	env := &batchEnv{srv: srv, br: o.br, store: store, clock: o.clock}
	env.stop = func() {
		once.Do(func() {
			cancel()
			<-done
			srv.Close()
			_ = store.Close()
		})
	}
	t.Cleanup(env.stop)
	return env
}

// call sends a request with key (none when empty) and decodes a JSON
// answer into out (when not nil); it returns the status.
func (e *batchEnv) call(t *testing.T, key, method, path string, body io.Reader, ctype string, out any) int {
	t.Helper()
	req, _ := http.NewRequest(method, e.srv.URL+path, body)
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			t.Fatalf("%s %s: %d %s", method, path, resp.StatusCode, b)
		}
	}
	return resp.StatusCode
}

func (e *batchEnv) upload(t *testing.T, key, purpose, content string) (fileObject, int, errorBody) {
	t.Helper()
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	_ = mw.WriteField("purpose", purpose)
	fw, _ := mw.CreateFormFile("file", "requests.jsonl")
	_, _ = fw.Write([]byte(content))
	_ = mw.Close()
	var raw json.RawMessage
	status := e.call(t, key, "POST", "/v1/files", &buf, mw.FormDataContentType(), &raw)
	var f fileObject
	var eb errorBody
	if status == 200 {
		_ = json.Unmarshal(raw, &f)
	} else {
		_ = json.Unmarshal(raw, &eb)
	}
	return f, status, eb
}

func (e *batchEnv) create(t *testing.T, key, fileID, endpoint, window string) batchObject {
	t.Helper()
	body := fmt.Sprintf(`{"input_file_id":%q,"endpoint":%q,"completion_window":%q,"metadata":{"job":"test"}}`, fileID, endpoint, window)
	var b batchObject
	if status := e.call(t, key, "POST", "/v1/batches", strings.NewReader(body), "application/json", &b); status != 200 {
		t.Fatalf("create batch: %d", status)
	}
	return b
}

// waitBatch polls the batch until cond holds, up to a generous deadline.
func (e *batchEnv) waitBatch(t *testing.T, key, id string, cond func(batchObject) bool) batchObject {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		var b batchObject
		e.call(t, key, "GET", "/v1/batches/"+id, nil, "", &b)
		if cond(b) {
			return b
		}
		if time.Now().After(deadline) {
			t.Fatalf("batch %s: condition not met; last %+v", id, b)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func status(s string) func(batchObject) bool {
	return func(b batchObject) bool { return b.Status == s }
}

func (e *batchEnv) content(t *testing.T, key string, id *string) []outputLine {
	t.Helper()
	if id == nil {
		return nil
	}
	req, _ := http.NewRequest("GET", e.srv.URL+"/v1/files/"+*id+"/content", nil)
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("content of %s: %d %s", *id, resp.StatusCode, b)
	}
	var out []outputLine
	for _, l := range strings.Split(strings.TrimSuffix(string(b), "\n"), "\n") {
		var o outputLine
		if err := json.Unmarshal([]byte(l), &o); err != nil {
			t.Fatalf("output line %q: %v", l, err)
		}
		out = append(out, o)
	}
	return out
}

func chatLines(n int, from int) string {
	var sb strings.Builder
	for i := from; i < from+n; i++ {
		fmt.Fprintf(&sb, `{"custom_id":"req-%d","method":"POST","url":"/v1/chat/completions","body":{"model":"tiny","messages":[{"role":"user","content":"question %d"}]}}`+"\n", i, i)
	}
	return sb.String()
}

// answers maps each custom_id of an output file to its answer's text,
// failing on a custom_id seen twice.
func answers(t *testing.T, lines []outputLine) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, l := range lines {
		if _, dup := out[l.CustomID]; dup {
			t.Fatalf("custom_id %s answered twice", l.CustomID)
		}
		if l.Response == nil || l.Response.StatusCode != 200 || l.Error != nil {
			t.Fatalf("line %+v is not a success", l)
		}
		body, _ := json.Marshal(l.Response.Body)
		var c struct {
			Object  string `json:"object"`
			Choices []struct {
				Message struct{ Content string } `json:"message"`
			} `json:"choices"`
		}
		_ = json.Unmarshal(body, &c)
		if c.Object != "chat.completion" || len(c.Choices) != 1 {
			t.Fatalf("line body %s is not a chat completion", body)
		}
		out[l.CustomID] = c.Choices[0].Message.Content
	}
	return out
}

func TestBatchCompletes(t *testing.T) {
	t.Parallel()
	e := setupBatches(t, batchOpts{})
	f, st, _ := e.upload(t, "", "batch", chatLines(40, 0))
	if st != 200 || f.Object != "file" || f.Purpose != "batch" || f.Status != "processed" || f.Bytes != int64(len(chatLines(40, 0))) {
		t.Fatalf("upload: %d %+v", st, f)
	}
	b := e.create(t, "", f.ID, "/v1/chat/completions", "24h")
	if b.Status != "validating" || *b.ExpiresAt-b.CreatedAt != 24*3600 || b.Metadata["job"] != "test" {
		t.Fatalf("created: %+v", b)
	}
	b = e.waitBatch(t, "", b.ID, status("completed"))
	if b.RequestCounts != (requestCounts{Total: 40, Completed: 40}) || b.ErrorFileID != nil || b.CompletedAt == nil || b.InProgressAt == nil || b.FinalizingAt == nil {
		t.Fatalf("completed: %+v", b)
	}
	got := answers(t, e.content(t, "", b.OutputFileID))
	for i := range 40 {
		if want := fmt.Sprintf("echo: question %d", i); got[fmt.Sprintf("req-%d", i)] != want {
			t.Fatalf("req-%d: %q, want %q", i, got[fmt.Sprintf("req-%d", i)], want)
		}
	}
	// What went to the queue: the bulk lane, the batch's deadline, the
	// results queue, the custom_id as the request's id.
	for _, m := range e.br.published() {
		var req wire.Request
		if err := json.Unmarshal(m.Body, &req); err != nil {
			t.Fatal(err)
		}
		if m.Queue != "q.bulk" || m.ReplyTo != "sous.batch.results" || !strings.HasPrefix(req.ID, "req-") ||
			req.Deadline == nil || req.Deadline.Unix() != *b.ExpiresAt || req.Stream {
			t.Fatalf("published %+v %+v", m, req)
		}
	}
	var out fileObject
	e.call(t, "", "GET", "/v1/files/"+*b.OutputFileID, nil, "", &out)
	if out.Purpose != "batch_output" {
		t.Fatalf("output file: %+v", out)
	}
}

func TestBatchRecordsARedeliveredResultOnce(t *testing.T) {
	t.Parallel()
	br := newFakeBatchBroker()
	br.copies = 3
	e := setupBatches(t, batchOpts{br: br})
	f, _, _ := e.upload(t, "", "batch", chatLines(25, 0))
	b := e.waitBatch(t, "", e.create(t, "", f.ID, "/v1/chat/completions", "24h").ID, status("completed"))
	if b.RequestCounts != (requestCounts{Total: 25, Completed: 25}) {
		t.Fatalf("counts: %+v", b.RequestCounts)
	}
	if got := answers(t, e.content(t, "", b.OutputFileID)); len(got) != 25 {
		t.Fatalf("%d lines", len(got))
	}
}

func TestBatchOtherEndpointsAndFailures(t *testing.T) {
	t.Parallel()
	e := setupBatches(t, batchOpts{})
	lines := `{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{"model":"tiny","input":["one","three"]}}
{"custom_id":"b","method":"POST","url":"/v1/embeddings","body":{"model":"tiny","input":"please fail"}}
`
	f, _, _ := e.upload(t, "", "batch", lines)
	b := e.waitBatch(t, "", e.create(t, "", f.ID, "/v1/embeddings", "24h").ID, status("completed"))
	if b.RequestCounts != (requestCounts{Total: 2, Completed: 1, Failed: 1}) || b.OutputFileID == nil || b.ErrorFileID == nil {
		t.Fatalf("%+v", b)
	}
	ok := e.content(t, "", b.OutputFileID)
	body, _ := json.Marshal(ok[0].Response.Body)
	if ok[0].CustomID != "a" || !strings.Contains(string(body), `"embedding":[3]`) || !strings.Contains(string(body), `"embedding":[5]`) {
		t.Fatalf("output %s", body)
	}
	bad := e.content(t, "", b.ErrorFileID)
	eb, _ := json.Marshal(bad[0].Response.Body)
	if bad[0].CustomID != "b" || bad[0].Response.StatusCode != 400 || strings.Contains(string(eb), "/internal/path") || !strings.Contains(string(eb), "engine_rejected") {
		t.Fatalf("error line %+v %s", bad[0], eb)
	}
}

func TestBatchValidationFails(t *testing.T) {
	t.Parallel()
	e := setupBatches(t, batchOpts{})
	lines := chatLines(2, 0) +
		`{"custom_id":"req-1","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"dup"}]}}` + "\n" +
		`{"custom_id":"x","method":"POST","url":"/v1/embeddings","body":{"input":"hi"}}` + "\n" +
		`{"custom_id":"y","method":"POST","url":"/v1/chat/completions","body":{"model":"gpt-9","messages":[{"role":"user","content":"hi"}]}}` + "\n" +
		`{"custom_id":"z","method":"POST","url":"/v1/chat/completions","body":{"messages":[]}}` + "\n" +
		`{"method":"POST","url":"/v1/chat/completions","body":{}}` + "\n" +
		`{"custom_id":"s","method":"POST","url":"/v1/chat/completions","body":{"stream":true,"messages":[{"role":"user","content":"hi"}]}}` + "\n"
	f, _, _ := e.upload(t, "", "batch", lines)
	b := e.waitBatch(t, "", e.create(t, "", f.ID, "/v1/chat/completions", "24h").ID, status("failed"))
	if b.Errors == nil || b.FailedAt == nil {
		t.Fatalf("%+v", b)
	}
	want := map[int]string{3: "duplicate_custom_id", 4: "mismatched_endpoint", 5: "model_not_found", 6: "invalid_request", 7: "missing_required_parameter", 8: "invalid_request"}
	got := map[int]string{}
	for _, d := range b.Errors.Data {
		if d.Line == nil {
			t.Fatalf("error without a line: %+v", d)
		}
		got[*d.Line] = d.Code
	}
	for line, code := range want {
		if got[line] != code {
			t.Errorf("line %d: %q, want %q (all: %v)", line, got[line], code, got)
		}
	}
	if len(e.br.published()) != 0 {
		t.Fatal("a failed batch published lines")
	}
}

func TestBatchUploadRefusals(t *testing.T) {
	t.Parallel()
	e := setupBatches(t, batchOpts{cfg: func(c *Config) { c.Batch.MaxFileBytes = 1000 }})
	for _, tc := range []struct {
		name, purpose, content string
		status                 int
		code                   string
	}{
		{"purpose", "fine-tune", chatLines(1, 0), 400, "invalid_request"},
		{"not JSONL", "batch", "hello\n", 400, "invalid_file_format"},
		{"too large", "batch", chatLines(20, 0), 413, "file_too_large"},
		{"empty", "batch", "", 400, "invalid_request"},
	} {
		_, st, eb := e.upload(t, "", tc.purpose, tc.content)
		if st != tc.status || eb.Error.Code == nil || *eb.Error.Code != tc.code {
			t.Errorf("%s: %d %+v", tc.name, st, eb.Error)
		}
	}
	var list listObject[fileObject]
	e.call(t, "", "GET", "/v1/files", nil, "", &list)
	if len(list.Data) != 0 {
		t.Fatalf("a refused upload was kept: %+v", list)
	}
}

func TestBatchKeysSeeOnlyTheirOwn(t *testing.T) {
	t.Parallel()
	e := setupBatches(t, batchOpts{keys: keyLine("alice", "sk-alice", "") + keyLine("bob", "sk-bob", "")})
	f, _, _ := e.upload(t, "sk-alice", "batch", chatLines(3, 0))
	b := e.create(t, "sk-alice", f.ID, "/v1/chat/completions", "24h")
	b = e.waitBatch(t, "sk-alice", b.ID, status("completed"))
	for _, path := range []string{"/v1/files/" + f.ID, "/v1/files/" + f.ID + "/content", "/v1/batches/" + b.ID, "/v1/files/" + *b.OutputFileID} {
		if st := e.call(t, "sk-bob", "GET", path, nil, "", nil); st != 404 {
			t.Errorf("bob GET %s: %d", path, st)
		}
	}
	if st := e.call(t, "sk-bob", "POST", "/v1/batches/"+b.ID+"/cancel", nil, "", nil); st != 404 {
		t.Errorf("bob cancels alice's batch: %d", st)
	}
	if st := e.call(t, "sk-bob", "DELETE", "/v1/files/"+f.ID, nil, "", nil); st != 404 {
		t.Errorf("bob deletes alice's file: %d", st)
	}
	body := fmt.Sprintf(`{"input_file_id":%q,"endpoint":"/v1/chat/completions","completion_window":"24h"}`, f.ID)
	if st := e.call(t, "sk-bob", "POST", "/v1/batches", strings.NewReader(body), "application/json", nil); st != 404 {
		t.Errorf("bob runs alice's file: %d", st)
	}
	var bl listObject[batchObject]
	var fl listObject[fileObject]
	e.call(t, "sk-bob", "GET", "/v1/batches", nil, "", &bl)
	e.call(t, "sk-bob", "GET", "/v1/files", nil, "", &fl)
	if len(bl.Data)+len(fl.Data) != 0 {
		t.Fatalf("bob lists alice's: %+v %+v", bl, fl)
	}
	if st := e.call(t, "", "GET", "/v1/batches", nil, "", nil); st != 401 {
		t.Fatalf("no key: %d", st)
	}
}

func TestBatchListPaginates(t *testing.T) {
	t.Parallel()
	e := setupBatches(t, batchOpts{})
	f, _, _ := e.upload(t, "", "batch", chatLines(1, 0))
	var ids []string
	for range 5 {
		ids = append(ids, e.create(t, "", f.ID, "/v1/chat/completions", "24h").ID)
		e.clock.Add(time.Second) // distinct created_at, newest first
	}
	slices.Reverse(ids)
	var seen []string
	after := ""
	for page := 0; ; page++ {
		var l listObject[batchObject]
		e.call(t, "", "GET", "/v1/batches?limit=2"+after, nil, "", &l)
		for _, b := range l.Data {
			seen = append(seen, b.ID)
		}
		if !l.HasMore {
			break
		}
		if page > 5 || l.LastID == nil {
			t.Fatalf("pagination does not end: %+v", l)
		}
		after = "&after=" + *l.LastID
	}
	if !slices.Equal(seen, ids) {
		t.Fatalf("pages %v, want %v", seen, ids)
	}
}

func TestBatchCancel(t *testing.T) {
	t.Parallel()
	br := newFakeBatchBroker()
	br.manual = true
	e := setupBatches(t, batchOpts{br: br, cfg: func(c *Config) { c.Batch.Outstanding = 4 }})
	f, _, _ := e.upload(t, "", "batch", chatLines(10, 0))
	b := e.create(t, "", f.ID, "/v1/chat/completions", "24h")
	e.waitBatch(t, "", b.ID, status("in_progress"))
	eventually(t, func() bool { return len(br.published()) == 4 })
	var c batchObject
	if st := e.call(t, "", "POST", "/v1/batches/"+b.ID+"/cancel", nil, "", &c); st != 200 || c.Status != "cancelling" || c.CancellingAt == nil {
		t.Fatalf("cancel: %d %+v", st, c)
	}
	// What is already out may finish; nothing more is published.
	for _, m := range br.published() {
		br.reply(m)
	}
	b = e.waitBatch(t, "", b.ID, status("cancelled"))
	if len(br.published()) != 4 || b.RequestCounts != (requestCounts{Total: 10, Completed: 4, Failed: 6}) {
		t.Fatalf("%d published; %+v", len(br.published()), b.RequestCounts)
	}
	if got := answers(t, e.content(t, "", b.OutputFileID)); len(got) != 4 {
		t.Fatalf("output: %v", got)
	}
	for _, l := range e.content(t, "", b.ErrorFileID) {
		if l.Error == nil || l.Error.Code != "batch_cancelled" || l.Response != nil {
			t.Fatalf("error line %+v", l)
		}
	}
	if st := e.call(t, "", "POST", "/v1/batches/"+b.ID+"/cancel", nil, "", nil); st != 409 {
		t.Fatalf("cancel a cancelled batch: %d", st)
	}
}

func TestBatchExpiresKeepingWhatFinished(t *testing.T) {
	t.Parallel()
	br := newFakeBatchBroker()
	br.manual = true
	e := setupBatches(t, batchOpts{br: br, cfg: func(c *Config) { c.Batch.Outstanding = 3 }})
	f, _, _ := e.upload(t, "", "batch", chatLines(8, 0))
	b := e.create(t, "", f.ID, "/v1/chat/completions", "30m")
	eventually(t, func() bool { return len(br.published()) == 3 })
	for _, m := range br.published()[:2] {
		br.reply(m)
	}
	e.waitBatch(t, "", b.ID, func(b batchObject) bool { return b.RequestCounts.Completed == 2 })
	e.clock.Add(31 * time.Minute)
	b = e.waitBatch(t, "", b.ID, status("expired"))
	if b.RequestCounts != (requestCounts{Total: 8, Completed: 2, Failed: 6}) || b.ExpiredAt == nil {
		t.Fatalf("%+v", b)
	}
	if got := answers(t, e.content(t, "", b.OutputFileID)); len(got) != 2 {
		t.Fatalf("kept %v", got)
	}
	for _, l := range e.content(t, "", b.ErrorFileID) {
		if l.Error == nil || l.Error.Code != "batch_expired" {
			t.Fatalf("error line %+v", l)
		}
	}
	// A late result of an expired batch changes nothing.
	br.reply(br.published()[2])
	eventually(t, func() bool { br.mu.Lock(); defer br.mu.Unlock(); return br.acks == 3 })
	if b2 := e.waitBatch(t, "", b.ID, status("expired")); b2.RequestCounts != b.RequestCounts {
		t.Fatalf("late result counted: %+v", b2.RequestCounts)
	}
}

func TestBatchPacesAndSharesTheQueue(t *testing.T) {
	t.Parallel()
	br := newFakeBatchBroker()
	br.manual = true
	e := setupBatches(t, batchOpts{br: br, cfg: func(c *Config) { c.Batch.Outstanding = 6 }})
	f1, _, _ := e.upload(t, "", "batch", chatLines(30, 0))
	f2, _, _ := e.upload(t, "", "batch", chatLines(30, 100))
	b1 := e.create(t, "", f1.ID, "/v1/chat/completions", "24h")
	b2 := e.create(t, "", f2.ID, "/v1/chat/completions", "24h")
	e.waitBatch(t, "", b1.ID, status("in_progress"))
	e.waitBatch(t, "", b2.ID, status("in_progress"))
	// A batch that starts alone may take the whole window; once both run,
	// the room that frees goes to each up to its even share.
	eventually(t, func() bool { return len(br.published()) == 6 })
	for _, m := range br.published()[:3] {
		br.reply(m)
	}
	eventually(t, func() bool { return len(br.published()) == 9 })
	per := map[string]int{}
	for _, m := range br.published()[3:] {
		id, _, _, _, _ := parseCorrelation(m.ID)
		per[id]++
	}
	if per[b1.ID] != 3 || per[b2.ID] != 3 {
		t.Fatalf("lines out per batch: %v, want 3 each", per)
	}
	answered := 3
	for answered < 60 {
		eventually(t, func() bool { return len(br.published()) > answered })
		if out := br.published()[answered:]; len(out) > 6 {
			t.Fatalf("%d lines out at once; the bound is 6", len(out))
		}
		br.reply(br.published()[answered])
		answered++
	}
	e.waitBatch(t, "", b1.ID, status("completed"))
	e.waitBatch(t, "", b2.ID, status("completed"))
}

// A gateway that stops mid-batch and starts again over the same store
// finishes the batch; a line published twice is recorded once.
func TestBatchSurvivesARestart(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "batches.db")
	br := newFakeBatchBroker()
	br.manual = true
	clock := &fakeClock{t: time.Now()}
	e := setupBatches(t, batchOpts{path: path, br: br, clock: clock, cfg: func(c *Config) { c.Batch.Outstanding = 10 }})
	f, _, _ := e.upload(t, "", "batch", chatLines(30, 0))
	b := e.create(t, "", f.ID, "/v1/chat/completions", "24h")
	eventually(t, func() bool { return len(br.published()) == 10 })
	for _, m := range br.published()[:5] {
		br.reply(m)
	}
	e.waitBatch(t, "", b.ID, func(b batchObject) bool { return b.RequestCounts.Completed == 5 })
	e.stop()

	// The broker redelivers everything the first gateway had out, and the
	// new one publishes the rest; the results of the first five come twice.
	br2 := newFakeBatchBroker()
	for _, m := range br.published() {
		br2.reply(m)
	}
	e2 := setupBatches(t, batchOpts{path: path, br: br2, clock: clock})
	b2 := e2.waitBatch(t, "", b.ID, status("completed"))
	if b2.RequestCounts != (requestCounts{Total: 30, Completed: 30}) {
		t.Fatalf("%+v", b2.RequestCounts)
	}
	got := answers(t, e2.content(t, "", b2.OutputFileID))
	if len(got) != 30 {
		t.Fatalf("%d answers", len(got))
	}
}

func TestBatchAPIOff(t *testing.T) {
	t.Parallel()
	srv, _ := setup(t, setupOpts{})
	resp, err := http.Get(srv.URL + "/v1/batches")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 404 || !strings.Contains(string(b), "Batch API") {
		t.Fatalf("%d %s", resp.StatusCode, b)
	}
}

func TestParseCorrelation(t *testing.T) {
	t.Parallel()
	c := lineCorrelation("batch_abc", 41, epEmbedding, true)
	id, i, ep, b64, ok := parseCorrelation(c)
	if !ok || id != "batch_abc" || i != 41 || ep != epEmbedding || !b64 {
		t.Fatalf("%s: %v %v %v %v %v", c, id, i, ep, b64, ok)
	}
	for _, bad := range []string{"", "x", "sous-batch:", "sous-batch:a:b:c", "sous-batch:a:-1:c", "sous-batch:a:1:z", "sous-batch::1:c"} {
		if _, _, _, _, ok := parseCorrelation(bad); ok {
			t.Errorf("%q parsed", bad)
		}
	}
}

// eventually waits for cond with a deadline a loaded machine meets.
func eventually(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 60s")
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// The publisher tells the scaler what the running batches still need
// answered, by deadline: the broker cannot.
func TestBatchTellsTheScalerItsDeadlines(t *testing.T) {
	t.Parallel()
	br := newFakeBatchBroker()
	br.manual = true
	e := setupBatches(t, batchOpts{br: br, cfg: func(c *Config) { c.Batch.Outstanding = 4 }})
	f, _, _ := e.upload(t, "", "batch", chatLines(10, 0))
	b := e.create(t, "", f.ID, "/v1/chat/completions", "2h")
	eventually(t, func() bool { return len(br.published()) == 4 })
	// Demands go out every few seconds; the first after the batch started
	// holds all ten.
	eventually(t, func() bool {
		d := br.lastDemand()
		return len(d.Due) == 1 && d.Due[0].Requests == 10
	})
	d := br.lastDemand()
	if _, err := fleet.DecodeDemand(br.demands[len(br.demands)-1]); err != nil || d.Queue != "q.bulk" || d.Due[0].By.Unix() != *b.ExpiresAt {
		t.Fatalf("demand %+v: %v", d, err)
	}
	for _, m := range br.published() {
		br.reply(m)
	}
	eventually(t, func() bool { d := br.lastDemand(); return len(d.Due) == 1 && d.Due[0].Requests == 6 })
}

// A result for a batch this store does not know is handed back to the
// queue (another gateway's store may know it), not acked and lost.
func TestBatchHandsBackResultsOfUnknownBatches(t *testing.T) {
	t.Parallel()
	br := newFakeBatchBroker()
	setupBatches(t, batchOpts{br: br})
	br.reply(Message{ID: lineCorrelation("batch_elsewhere", 0, epChat, false), Body: []byte(`{"id":"x","messages":[{"role":"user","content":"hi"}]}`)})
	eventually(t, func() bool { br.mu.Lock(); defer br.mu.Unlock(); return br.nacks == 1 })
	br.mu.Lock()
	defer br.mu.Unlock()
	if br.acks != 0 {
		t.Fatalf("%d acks", br.acks)
	}
}

func TestBatchRefusesHugeLinesAndUnknownCursors(t *testing.T) {
	t.Parallel()
	e := setupBatches(t, batchOpts{})
	// One line, no newline, longer than any request: refused as it
	// arrives, never held whole.
	_, st, eb := e.upload(t, "", "batch", `{"custom_id":"`+strings.Repeat("x", 20000)+`"}`)
	if st != 400 || eb.Error.Code == nil || *eb.Error.Code != "invalid_file_format" {
		t.Fatalf("a 20 kB line: %d %+v", st, eb.Error)
	}
	for _, path := range []string{"/v1/batches?after=batch_nope", "/v1/files?after=file-nope"} {
		var eb errorBody
		if st := e.call(t, "", "GET", path, nil, "", &eb); st != 400 || eb.Error.Param == nil || *eb.Error.Param != "after" {
			t.Errorf("%s: %d %+v", path, st, eb.Error)
		}
	}
}

func TestBatchDropsAnOrphanResultInTheEnd(t *testing.T) {
	t.Parallel()
	br := newFakeBatchBroker()
	setupBatches(t, batchOpts{br: br})
	body, _ := json.Marshal(wire.Result{ID: "x", Status: wire.StatusOK})
	br.results <- Delivery{CorrelationID: lineCorrelation("batch_gone", 0, epChat, false), Body: body, Returned: maxHandBacks,
		Ack:  func() error { br.mu.Lock(); br.acks++; br.mu.Unlock(); return nil },
		Nack: func() error { br.mu.Lock(); br.nacks++; br.mu.Unlock(); return nil }}
	eventually(t, func() bool { br.mu.Lock(); defer br.mu.Unlock(); return br.acks == 1 })
}
