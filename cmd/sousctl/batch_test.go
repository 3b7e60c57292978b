package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

const testKey = "sk-test-never-shown-7f3a"

// fakeBatchAPI is a small in-memory OpenAI Batch API: files and batches
// as the gateway serves them. Each GET of a batch moves it one step along
// its plan, so that a watch sees every status in order whatever the
// timing.
type fakeBatchAPI struct {
	t   *testing.T
	srv *httptest.Server

	mu      sync.Mutex
	files   map[string]*fakeFile
	batches map[string]*fakeBatch
	order   []string // batch ids, oldest first
	n       int
	auth    []string // every Authorization header received
	chunked bool     // every upload came without a Content-Length
	plan    string   // "ok" (default) or "fail": how new batches go
}

type fakeFile struct {
	Object    string `json:"object"`
	ID        string `json:"id"`
	Bytes     int    `json:"bytes"`
	CreatedAt int64  `json:"created_at"`
	Filename  string `json:"filename"`
	Purpose   string `json:"purpose"`
	Status    string `json:"status"`

	content []byte
}

type fakeBatchErrors struct {
	Object string `json:"object"`
	Data   []struct {
		Code    string  `json:"code"`
		Message string  `json:"message"`
		Param   *string `json:"param"`
		Line    *int    `json:"line"`
	} `json:"data"`
}

type fakeBatch struct {
	ID               string            `json:"id"`
	Object           string            `json:"object"`
	Endpoint         string            `json:"endpoint"`
	Errors           *fakeBatchErrors  `json:"errors"`
	InputFileID      string            `json:"input_file_id"`
	CompletionWindow string            `json:"completion_window"`
	Status           string            `json:"status"`
	OutputFileID     *string           `json:"output_file_id"`
	ErrorFileID      *string           `json:"error_file_id"`
	CreatedAt        int64             `json:"created_at"`
	InProgressAt     *int64            `json:"in_progress_at"`
	ExpiresAt        *int64            `json:"expires_at"`
	FinalizingAt     *int64            `json:"finalizing_at"`
	CompletedAt      *int64            `json:"completed_at"`
	FailedAt         *int64            `json:"failed_at"`
	ExpiredAt        *int64            `json:"expired_at"`
	CancellingAt     *int64            `json:"cancelling_at"`
	CancelledAt      *int64            `json:"cancelled_at"`
	RequestCounts    map[string]int    `json:"request_counts"`
	Metadata         map[string]string `json:"metadata"`

	plan  string
	step  int
	lines []string // custom_ids of the input
}

func newFakeBatchAPI(t *testing.T) *fakeBatchAPI {
	t.Helper()
	f := &fakeBatchAPI{t: t, files: map[string]*fakeFile{}, batches: map[string]*fakeBatch{}, chunked: true, plan: "ok"}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/files", f.upload)
	mux.HandleFunc("GET /v1/files/{id}", func(w http.ResponseWriter, r *http.Request) {
		if fl := f.file(w, r); fl != nil {
			writeJSON(w, 200, fl)
		}
	})
	mux.HandleFunc("GET /v1/files/{id}/content", func(w http.ResponseWriter, r *http.Request) {
		if fl := f.file(w, r); fl != nil {
			w.Header().Set("Content-Type", "application/jsonl")
			w.Write(fl.content)
		}
	})
	mux.HandleFunc("DELETE /v1/files/{id}", func(w http.ResponseWriter, r *http.Request) {
		if fl := f.file(w, r); fl != nil {
			f.mu.Lock()
			delete(f.files, fl.ID)
			f.mu.Unlock()
			writeJSON(w, 200, map[string]any{"id": fl.ID, "object": "file", "deleted": true})
		}
	})
	mux.HandleFunc("POST /v1/batches", f.create)
	mux.HandleFunc("GET /v1/batches/{id}", func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		defer f.mu.Unlock()
		if b := f.batchLocked(w, r); b != nil {
			f.advanceLocked(b)
			writeJSON(w, 200, b)
		}
	})
	mux.HandleFunc("POST /v1/batches/{id}/cancel", func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		defer f.mu.Unlock()
		if b := f.batchLocked(w, r); b != nil {
			b.Status, b.CancellingAt, b.plan = "cancelling", ptr(int64(1700000100)), "cancel"
			writeJSON(w, 200, b)
		}
	})
	mux.HandleFunc("GET /v1/batches", func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		defer f.mu.Unlock()
		var data []*fakeBatch
		for _, id := range slices.Backward(f.order) {
			data = append(data, f.batches[id])
		}
		if a := r.URL.Query().Get("after"); a != "" {
			i := slices.IndexFunc(data, func(b *fakeBatch) bool { return b.ID == a })
			data = data[i+1:]
		}
		limit := 20
		fmt.Sscan(r.URL.Query().Get("limit"), &limit)
		more := len(data) > limit
		data = data[:min(limit, len(data))]
		writeJSON(w, 200, map[string]any{"object": "list", "data": data, "has_more": more})
	})
	f.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		f.auth = append(f.auth, r.Header.Get("Authorization"))
		f.mu.Unlock()
		if r.Header.Get("Authorization") != "Bearer "+testKey {
			apiErr(w, 401, "Incorrect API key provided.", "invalid_api_key")
			return
		}
		mux.ServeHTTP(w, r)
	}))
	t.Cleanup(f.srv.Close)
	return f
}

func ptr[T any](v T) *T { return &v }

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

func apiErr(w http.ResponseWriter, code int, msg, errCode string) {
	writeJSON(w, code, map[string]any{"error": map[string]any{"message": msg, "type": "invalid_request_error", "param": nil, "code": errCode}})
}

func (f *fakeBatchAPI) upload(w http.ResponseWriter, r *http.Request) {
	if r.ContentLength != -1 {
		f.mu.Lock()
		f.chunked = false
		f.mu.Unlock()
	}
	if err := r.ParseMultipartForm(1 << 20); err != nil {
		apiErr(w, 400, err.Error(), "")
		return
	}
	file, hdr, err := r.FormFile("file")
	if err != nil {
		apiErr(w, 400, "missing file", "")
		return
	}
	content, _ := io.ReadAll(file)
	f.mu.Lock()
	defer f.mu.Unlock()
	fl := f.addFileLocked(hdr.Filename, r.FormValue("purpose"), content)
	writeJSON(w, 200, fl)
}

func (f *fakeBatchAPI) addFileLocked(name, purpose string, content []byte) *fakeFile {
	f.n++
	fl := &fakeFile{Object: "file", ID: fmt.Sprintf("file-%d", f.n), Bytes: len(content), CreatedAt: 1700000000,
		Filename: name, Purpose: purpose, Status: "processed", content: content}
	f.files[fl.ID] = fl
	return fl
}

func (f *fakeBatchAPI) file(w http.ResponseWriter, r *http.Request) *fakeFile {
	f.mu.Lock()
	defer f.mu.Unlock()
	fl := f.files[r.PathValue("id")]
	if fl == nil {
		apiErr(w, 404, "No such File object: "+r.PathValue("id"), "")
	}
	return fl
}

func (f *fakeBatchAPI) batchLocked(w http.ResponseWriter, r *http.Request) *fakeBatch {
	b := f.batches[r.PathValue("id")]
	if b == nil {
		apiErr(w, 404, "No batch found with id '"+r.PathValue("id")+"'.", "")
	}
	return b
}

func (f *fakeBatchAPI) create(w http.ResponseWriter, r *http.Request) {
	var req struct {
		InputFileID      string            `json:"input_file_id"`
		Endpoint         string            `json:"endpoint"`
		CompletionWindow string            `json:"completion_window"`
		Metadata         map[string]string `json:"metadata"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		apiErr(w, 400, err.Error(), "")
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	in := f.files[req.InputFileID]
	switch {
	case in == nil:
		apiErr(w, 400, "No such file: "+req.InputFileID, "")
		return
	case req.Endpoint != "/v1/chat/completions" && req.Endpoint != "/v1/completions" && req.Endpoint != "/v1/embeddings":
		apiErr(w, 400, "Invalid value for 'endpoint': "+req.Endpoint, "invalid_value")
		return
	}
	var ids []string
	for _, l := range strings.Split(strings.TrimSpace(string(in.content)), "\n") {
		var line struct {
			CustomID string `json:"custom_id"`
		}
		json.Unmarshal([]byte(l), &line)
		ids = append(ids, line.CustomID)
	}
	f.n++
	b := &fakeBatch{ID: fmt.Sprintf("batch_%d", f.n), Object: "batch", Endpoint: req.Endpoint, InputFileID: in.ID,
		CompletionWindow: req.CompletionWindow, Status: "validating", CreatedAt: 1700000000,
		RequestCounts: map[string]int{"total": 0, "completed": 0, "failed": 0}, Metadata: req.Metadata,
		plan: f.plan, lines: ids}
	f.batches[b.ID] = b
	f.order = append(f.order, b.ID)
	writeJSON(w, 200, b)
}

// advanceLocked moves b one step along its plan. "ok": in_progress with
// nothing done, half done, finalizing, completed (the last line failed:
// an output and an error file). "fail": failed at validation.
// "cancel": cancelled.
func (f *fakeBatchAPI) advanceLocked(b *fakeBatch) {
	b.step++
	total := len(b.lines)
	switch b.plan {
	case "fail":
		if b.step < 2 {
			return
		}
		b.Status, b.FailedAt = "failed", ptr(int64(1700000001))
		b.Errors = &fakeBatchErrors{Object: "list"}
		b.Errors.Data = append(b.Errors.Data, struct {
			Code    string  `json:"code"`
			Message string  `json:"message"`
			Param   *string `json:"param"`
			Line    *int    `json:"line"`
		}{Code: "invalid_json_line", Message: "This line is not parseable as valid JSON.", Line: ptr(2)})
	case "cancel":
		b.Status, b.CancelledAt = "cancelled", ptr(int64(1700000101))
	default:
		switch b.step {
		case 1:
			return // still validating
		case 2:
			b.Status, b.InProgressAt = "in_progress", ptr(int64(1700000001))
			b.RequestCounts["total"] = total
		case 3:
			b.RequestCounts["completed"] = total / 2
		case 4:
			b.Status, b.FinalizingAt = "finalizing", ptr(int64(1700000002))
			b.RequestCounts["completed"], b.RequestCounts["failed"] = total-1, 1
		case 5:
			var out, errs bytes.Buffer
			for i, id := range b.lines {
				if i == total-1 {
					fmt.Fprintf(&errs, `{"id":"batch_req_%d","custom_id":%q,"response":null,"error":{"code":"engine_error","message":"the engine failed"}}`+"\n", i, id)
					continue
				}
				fmt.Fprintf(&out, `{"id":"batch_req_%d","custom_id":%q,"response":{"status_code":200,"request_id":"req_%d","body":{"object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"answer %d ✓"}}]}},"error":null}`+"\n", i, id, i, i)
			}
			b.OutputFileID = &f.addFileLocked(b.ID+"_output.jsonl", "batch_output", out.Bytes()).ID
			b.ErrorFileID = &f.addFileLocked(b.ID+"_error.jsonl", "batch_output", errs.Bytes()).ID
			b.Status, b.CompletedAt = "completed", ptr(int64(1700000003))
		}
	}
}

func (f *fakeBatchAPI) content(id string) []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	if fl := f.files[id]; fl != nil {
		return fl.content
	}
	return nil
}

func (f *fakeBatchAPI) batch(id string) fakeBatch {
	f.mu.Lock()
	defer f.mu.Unlock()
	return *f.batches[id]
}

// runBatch runs `sousctl batch args...` in the process against the fake.
func runBatch(t *testing.T, f *fakeBatchAPI, args ...string) result {
	t.Helper()
	return runBatchCtx(t, context.Background(), f, args...)
}

func runBatchCtx(t *testing.T, ctx context.Context, f *fakeBatchAPI, args ...string) result {
	t.Helper()
	args = append(append([]string{"batch"}, args...), "-url", f.srv.URL, "-key", testKey)
	var o, e bytes.Buffer
	code := run(ctx, args, strings.NewReader(""), &o, &e)
	r := result{stdout: o.String(), stderr: e.String(), code: code}
	if strings.Contains(r.stdout+r.stderr, testKey) {
		t.Errorf("sousctl %s printed the API key:\n%s%s", strings.Join(args, " "), r.stdout, r.stderr)
	}
	return r
}

// requestsFile writes n batch request lines to a file and returns its path
// and bytes.
func requestsFile(t *testing.T, n int) (string, []byte) {
	t.Helper()
	var b bytes.Buffer
	for i := range n {
		fmt.Fprintf(&b, `{"custom_id":"req-%d","method":"POST","url":"/v1/chat/completions","body":{"model":"llama3.2","messages":[{"role":"user","content":"question %d – é"}]}}`+"\n", i, i)
	}
	path := filepath.Join(t.TempDir(), "requests.jsonl")
	if err := os.WriteFile(path, b.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return path, b.Bytes()
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestBatchCreateUploadsAndCreates(t *testing.T) {
	t.Parallel()
	f := newFakeBatchAPI(t)
	path, content := requestsFile(t, 3)
	r := runBatch(t, f, "create", "-f", path, "-endpoint", "/v1/embeddings", "-window", "2h", "-metadata", "project=eval", "-metadata", "run=7")
	if r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	id := strings.TrimSpace(r.stdout)
	if id != "batch_2" {
		t.Fatalf("stdout %q, want the batch id alone", r.stdout)
	}
	b := f.batch(id)
	if b.Endpoint != "/v1/embeddings" || b.CompletionWindow != "2h" || b.Metadata["project"] != "eval" || b.Metadata["run"] != "7" {
		t.Errorf("batch created as %+v", b)
	}
	f.mu.Lock()
	in := f.files[b.InputFileID]
	chunked := f.chunked
	f.mu.Unlock()
	if in == nil || in.Purpose != "batch" || in.Filename != "requests.jsonl" || !bytes.Equal(in.content, content) {
		t.Fatalf("uploaded file %+v, want purpose batch, requests.jsonl, the file byte for byte", in)
	}
	if !chunked {
		t.Error("the upload had a Content-Length: it was buffered, not streamed")
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, a := range f.auth {
		if a != "Bearer "+testKey {
			t.Errorf("Authorization %q, want the key as Bearer", a)
		}
	}
}

func TestBatchCreateWaitDownloads(t *testing.T) {
	t.Parallel()
	f := newFakeBatchAPI(t)
	path, _ := requestsFile(t, 4)
	dir := t.TempDir()
	out, errs := filepath.Join(dir, "out.jsonl"), filepath.Join(dir, "errors.jsonl")
	r := runBatch(t, f, "create", "-f", path, "-wait", "-every", "1ms", "-o", out, "-errors", errs)
	if r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	b := f.batch(strings.TrimSpace(r.stdout))
	if got, want := readFile(t, out), f.content(*b.OutputFileID); len(want) == 0 || !bytes.Equal(got, want) {
		t.Errorf("output file:\n%s\nwant:\n%s", got, want)
	}
	if got, want := readFile(t, errs), f.content(*b.ErrorFileID); len(want) == 0 || !bytes.Equal(got, want) {
		t.Errorf("error file:\n%s\nwant:\n%s", got, want)
	}
	if !strings.Contains(r.stderr, "completed: 3 of 4 lines completed, 1 failed") {
		t.Errorf("stderr does not say how it ended:\n%s", r.stderr)
	}
	left, _ := filepath.Glob(filepath.Join(dir, ".*"))
	if len(left) > 0 {
		t.Errorf("temporary files left: %v", left)
	}
}

// Without a terminal, watch prints a line per status, in order, and ends
// at the terminal one.
func TestBatchWatchPlain(t *testing.T) {
	t.Parallel()
	f := newFakeBatchAPI(t)
	path, _ := requestsFile(t, 4)
	id := strings.TrimSpace(runBatch(t, f, "create", "-f", path).stdout)
	r := runBatch(t, f, "watch", id, "-every", "1ms")
	if r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	want := []string{
		id + " 0/0 done, 0 failed, validating",
		id + " 0/4 done, 0 failed, in_progress",
		id + " 4/4 done, 1 failed, finalizing",
		id + " 4/4 done, 1 failed, completed",
		id + " completed: 3 of 4 lines completed, 1 failed",
	}
	lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
	i := 0
	for _, l := range lines {
		if i < len(want) && strings.HasPrefix(l, want[i]) {
			i++
		}
	}
	if i < len(want) {
		t.Errorf("stderr:\n%s\nmissing, in this order, a line starting %q", r.stderr, want[i])
	}
	if strings.Contains(r.stderr, "\r") || strings.Contains(r.stderr, "[#") {
		t.Errorf("a progress bar without a terminal:\n%q", r.stderr)
	}
	if !strings.Contains(r.stderr, "has an error file") {
		t.Errorf("watch without -errors does not mention the error file:\n%s", r.stderr)
	}
	if r.stdout != "" {
		t.Errorf("stdout %q, want nothing", r.stdout)
	}
}

func TestBatchWatchFailedPrintsErrors(t *testing.T) {
	t.Parallel()
	f := newFakeBatchAPI(t)
	f.plan = "fail"
	path, _ := requestsFile(t, 2)
	out := filepath.Join(t.TempDir(), "out.jsonl")
	r := runBatch(t, f, "create", "-f", path, "-wait", "-every", "1ms", "-o", out)
	if r.code != 1 {
		t.Fatalf("exit %d, want 1: %s", r.code, r.stderr)
	}
	for _, want := range []string{"failed: 0 of 0 lines completed", "line 2: invalid_json_line: This line is not parseable as valid JSON.", "has no output file"} {
		if !strings.Contains(r.stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, r.stderr)
		}
	}
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Errorf("%s written for a batch without output: %v", out, err)
	}
}

func TestBatchGetListCancelDownload(t *testing.T) {
	t.Parallel()
	f := newFakeBatchAPI(t)
	path, _ := requestsFile(t, 2)
	var ids []string
	for range 3 {
		ids = append(ids, strings.TrimSpace(runBatch(t, f, "create", "-f", path).stdout))
	}

	r := runBatch(t, f, "get", ids[0])
	var got map[string]any
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &got) != nil || got["id"] != ids[0] || got["object"] != "batch" {
		t.Fatalf("get: exit %d, stdout %s, stderr %s", r.code, r.stdout, r.stderr)
	}
	if _, ok := got["cancelled_at"]; !ok {
		t.Errorf("get left out fields of the gateway's object: %s", r.stdout)
	}

	r = runBatch(t, f, "list", "-limit", "2")
	if r.code != 0 {
		t.Fatalf("list: exit %d: %s", r.code, r.stderr)
	}
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	if len(lines) != 4 || !strings.HasPrefix(lines[0], "ID") || !strings.HasPrefix(lines[1], ids[2]) || !strings.HasPrefix(lines[2], ids[1]) ||
		lines[3] != "more: sousctl batch list -after "+ids[1] {
		t.Errorf("list -limit 2:\n%s", r.stdout)
	}
	r = runBatch(t, f, "list", "-after", ids[1], "-json")
	var page struct {
		Data []struct{ ID string } `json:"data"`
	}
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &page) != nil || len(page.Data) != 1 || page.Data[0].ID != ids[0] {
		t.Errorf("list -after -json: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}

	r = runBatch(t, f, "cancel", ids[1])
	if r.code != 0 || r.stdout != ids[1]+" cancelling\n" {
		t.Errorf("cancel: exit %d, stdout %q, stderr %s", r.code, r.stdout, r.stderr)
	}
	r = runBatch(t, f, "watch", ids[1], "-every", "1ms")
	if r.code != 1 || !strings.Contains(r.stderr, ids[1]+" cancelled") {
		t.Errorf("watch of a cancelled batch: exit %d, want 1:\n%s", r.code, r.stderr)
	}

	// Download: the batch runs to completed through the fake's plan.
	for range 5 {
		runBatch(t, f, "get", ids[2])
	}
	dir := t.TempDir()
	out, errs := filepath.Join(dir, "o.jsonl"), filepath.Join(dir, "e.jsonl")
	r = runBatch(t, f, "download", ids[2], "-o", out, "-errors", errs)
	b := f.batch(ids[2])
	if r.code != 0 || !bytes.Equal(readFile(t, out), f.content(*b.OutputFileID)) || !bytes.Equal(readFile(t, errs), f.content(*b.ErrorFileID)) {
		t.Errorf("download: exit %d: %s", r.code, r.stderr)
	}
	r = runBatch(t, f, "download", ids[1], "-o", out)
	if r.code != 1 || !strings.Contains(r.stderr, "has no output file") {
		t.Errorf("download of a batch without output: exit %d, want 1: %s", r.code, r.stderr)
	}
}

// The gateway's errors reach the user as its message with the HTTP
// status, and the key never does.
func TestBatchGatewayErrors(t *testing.T) {
	t.Parallel()
	f := newFakeBatchAPI(t)
	path, _ := requestsFile(t, 2)

	r := runBatch(t, f, "get", "batch_nope")
	if r.code != 1 || !strings.Contains(r.stderr, "404 Not Found: No batch found with id 'batch_nope'.") {
		t.Errorf("get of a missing batch: exit %d: %s", r.code, r.stderr)
	}

	r = runBatch(t, f, "create", "-f", path, "-endpoint", "/v1/responses")
	if r.code != 1 || !strings.Contains(r.stderr, "400 Bad Request: Invalid value for 'endpoint': /v1/responses (invalid_value)") {
		t.Errorf("create with a bad endpoint: exit %d: %s", r.code, r.stderr)
	}
	f.mu.Lock()
	nfiles := len(f.files)
	f.mu.Unlock()
	if nfiles != 0 {
		t.Errorf("%d files left after the batch was refused; want the upload deleted", nfiles)
	}

	var o, e bytes.Buffer
	code := run(context.Background(), []string{"batch", "create", "-f", path, "-url", f.srv.URL, "-key", "sk-wrong-secret-99"}, nil, &o, &e)
	if code != 1 || !strings.Contains(e.String(), "401 Unauthorized: Incorrect API key provided.") || strings.Contains(o.String()+e.String(), "sk-wrong-secret-99") {
		t.Errorf("a refused key: exit %d\n%s%s", code, o.String(), e.String())
	}
}

// The key and the address come from the environment when no flag gives
// them: SOUS_API_KEY, else OPENAI_API_KEY.
func TestBatchEnvironment(t *testing.T) {
	f := newFakeBatchAPI(t)
	t.Setenv("SOUS_GATEWAY_URL", f.srv.URL+"/v1/")
	for _, env := range []string{"SOUS_API_KEY", "OPENAI_API_KEY"} {
		t.Setenv("SOUS_API_KEY", "")
		t.Setenv("OPENAI_API_KEY", "")
		t.Setenv(env, testKey)
		var o, e bytes.Buffer
		code := run(context.Background(), []string{"batch", "list"}, nil, &o, &e)
		if code != 0 || strings.Contains(o.String()+e.String(), testKey) {
			t.Errorf("key in %s: exit %d\n%s%s", env, code, o.String(), e.String())
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if got := f.auth[len(f.auth)-1]; got != "Bearer "+testKey {
		t.Errorf("Authorization %q", got)
	}
}

func TestBatchInterrupted(t *testing.T) {
	t.Parallel()
	f := newFakeBatchAPI(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	r := runBatchCtx(t, ctx, f, "watch", "batch_1", "-every", "1ms")
	if r.code != 130 {
		t.Errorf("exit %d, want 130: %s", r.code, r.stderr)
	}
}

func TestBatchUsage(t *testing.T) {
	t.Parallel()
	f := newFakeBatchAPI(t)
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"no command", nil, "usage: sousctl batch"},
		{"unknown command", []string{"submit"}, `unknown command "submit"`},
		{"create without -f", []string{"create"}, "-f FILE"},
		{"create with an argument", []string{"create", "-f", "x", "y"}, `unexpected argument "y"`},
		{"-o without -wait", []string{"create", "-f", "x", "-o", "out"}, "need -wait"},
		{"get without id", []string{"get"}, "one batch id"},
		{"get with two ids", []string{"get", "a", "b"}, "one batch id"},
		{"unknown flag", []string{"get", "a", "-wait"}, "unknown flag -wait"},
		{"every 0", []string{"watch", "a", "-every", "0s"}, "-every"},
		{"limit 0", []string{"list", "-limit", "0"}, "-limit"},
		{"download nothing", []string{"download", "a"}, "-o FILE"},
		{"same file", []string{"download", "a", "-o", "x", "-errors", "x"}, "same file"},
		{"bad metadata", []string{"create", "-f", "x", "-metadata", "novalue"}, "k=v"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var o, e bytes.Buffer
			args := append([]string{"batch"}, tc.args...)
			if len(tc.args) > 0 {
				args = append(args, "-url", f.srv.URL)
			}
			if code := run(context.Background(), args, nil, &o, &e); code != 2 || !strings.Contains(e.String(), tc.want) {
				t.Errorf("exit %d, stderr %q; want 2 and %q", code, e.String(), tc.want)
			}
		})
	}
	var o, e bytes.Buffer
	if code := run(context.Background(), []string{"batch", "get", "x", "-url", "amqp://localhost"}, nil, &o, &e); code != 2 || !strings.Contains(e.String(), "http://") {
		t.Errorf("an AMQP -url: exit %d, %s", code, e.String())
	}
	o.Reset()
	if code := run(context.Background(), []string{"help", "batch"}, nil, &o, &e); code != 0 || !strings.Contains(o.String(), "-every") {
		t.Errorf("help batch: exit %d\n%s", code, o.String())
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.auth) != 0 {
		t.Errorf("usage errors reached the gateway %d times", len(f.auth))
	}
}

// On a terminal the bar shows what is done, the rate since the watch
// began and the time left at that rate.
func TestBatchProgressBar(t *testing.T) {
	t.Parallel()
	var buf bytes.Buffer
	clock := time.Unix(1700000000, 0)
	w := &watcher{out: &buf, tty: true, now: func() time.Time { return clock }}
	b := batchObject{ID: "batch_1", Status: "in_progress"}
	b.RequestCounts.Total = 1000
	w.draw(b)
	clock = clock.Add(10 * time.Second)
	b.RequestCounts.Completed, b.RequestCounts.Failed = 407, 3
	w.draw(b)
	w.endLine()
	want := "\r[..............................] 0/1000 done, 0 failed, in_progress\x1b[K" +
		"\r[############..................] 410/1000 done, 3 failed, in_progress, 41/s, ETA 14s\x1b[K\n"
	if buf.String() != want {
		t.Errorf("bar:\n%q\nwant\n%q", buf.String(), want)
	}
}
