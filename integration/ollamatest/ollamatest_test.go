package ollamatest_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/sous-run/sous/integration/ollamatest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// client has no keep-alive, so that no connection to a killed server
// lingers for goleak to see.
var client = &http.Client{
	Timeout:   time.Minute,
	Transport: &http.Transport{DisableKeepAlives: true},
}

// post sends body as JSON and returns the status and the raw answer.
func post(t *testing.T, ctx context.Context, url string, body any) answer {
	t.Helper()
	a, err := postErr(ctx, url, body)
	if err != nil {
		t.Fatalf("POST %s: %v", url, err)
	}
	return a
}

type answer struct {
	status int
	body   []byte
}

func postErr(ctx context.Context, url string, body any) (answer, error) {
	b, err := json.Marshal(body)
	if err != nil {
		return answer{}, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(b))
	if err != nil {
		return answer{}, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return answer{}, err
	}
	defer resp.Body.Close()
	var buf bytes.Buffer
	if _, err := buf.ReadFrom(resp.Body); err != nil {
		return answer{}, err
	}
	return answer{resp.StatusCode, buf.Bytes()}, nil
}

// decode unmarshals a 200 answer into v.
func decode[T any](t *testing.T, a answer) T {
	t.Helper()
	if a.status != http.StatusOK {
		t.Fatalf("HTTP %d: %s", a.status, a.body)
	}
	var v T
	if err := json.Unmarshal(a.body, &v); err != nil {
		t.Fatalf("decode %s: %v", a.body, err)
	}
	return v
}

// Shapes of Ollama's answers, as far as sous relies on them. Pointers tell
// a missing field from a zero one.
type generateResponse struct {
	Model           string `json:"model"`
	Response        string `json:"response"`
	Done            bool   `json:"done"`
	DoneReason      string `json:"done_reason"`
	PromptEvalCount *int   `json:"prompt_eval_count"`
	EvalCount       *int   `json:"eval_count"`
	TotalDuration   int64  `json:"total_duration"`
}

type chatResponse struct {
	Message *struct {
		Role    string `json:"role"`
		Content string `json:"content"`
	} `json:"message"`
	Done            bool   `json:"done"`
	DoneReason      string `json:"done_reason"`
	PromptEvalCount *int   `json:"prompt_eval_count"`
	EvalCount       *int   `json:"eval_count"`
}

type completionResponse struct {
	Object  string `json:"object"`
	Choices []struct {
		Text         string `json:"text"`
		Index        int    `json:"index"`
		FinishReason string `json:"finish_reason"`
	} `json:"choices"`
	Usage struct {
		PromptTokens     int `json:"prompt_tokens"`
		CompletionTokens int `json:"completion_tokens"`
	} `json:"usage"`
}

type embedResponse struct {
	Model           string      `json:"model"`
	Embeddings      [][]float64 `json:"embeddings"`
	PromptEvalCount *int        `json:"prompt_eval_count"`
}

func ctxT(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// TestEndpoints records what the real Ollama answers on the endpoints the
// engines use.
func TestEndpoints(t *testing.T) {
	t.Parallel()
	srv := ollamatest.StartT(t, ollamatest.Options{Aliases: []string{"alias-a", "team/alias-b:v1"}})
	ctx := ctxT(t)
	url := srv.URL()
	if srv.Model() != "tiny" || srv.EndlessModel() != "tiny-endless" {
		t.Fatalf("models = %q, %q", srv.Model(), srv.EndlessModel())
	}

	t.Run("generate", func(t *testing.T) {
		req := map[string]any{
			"model": srv.Model(), "prompt": "hello world", "stream": false,
			"options": map[string]any{"seed": 42, "num_predict": 8},
		}
		got := decode[generateResponse](t, post(t, ctx, url+"/api/generate", req))
		if !got.Done || got.Model != "tiny" {
			t.Errorf("done = %v, model = %q", got.Done, got.Model)
		}
		if got.DoneReason != "stop" && got.DoneReason != "length" {
			t.Errorf("done_reason = %q, want stop or length", got.DoneReason)
		}
		// "hello world" is <s> plus 12 byte or piece tokens; the template
		// adds "user: " and "assistant:".
		if got.PromptEvalCount == nil || *got.PromptEvalCount < 13 {
			t.Errorf("prompt_eval_count = %v, want >= 13", got.PromptEvalCount)
		}
		if got.EvalCount == nil || *got.EvalCount < 1 || *got.EvalCount > 8 {
			t.Errorf("eval_count = %v, want 1..8 (num_predict 8)", got.EvalCount)
		}
		if strings.ContainsRune(got.Response, '\uFFFD') {
			t.Errorf("response %q has invalid UTF-8", got.Response)
		}
		again := decode[generateResponse](t, post(t, ctx, url+"/api/generate", req))
		if again.Response != got.Response {
			t.Errorf("same seed, different text: %q then %q", got.Response, again.Response)
		}
	})

	t.Run("generate endless runs to num_predict", func(t *testing.T) {
		req := map[string]any{
			"model": srv.EndlessModel(), "prompt": "hi", "stream": false,
			"options": map[string]any{"num_predict": 40},
		}
		got := decode[generateResponse](t, post(t, ctx, url+"/api/generate", req))
		if got.DoneReason != "length" || got.EvalCount == nil || *got.EvalCount != 40 {
			t.Errorf("done_reason = %q, eval_count = %v, want length, 40", got.DoneReason, got.EvalCount)
		}
		if strings.TrimSpace(got.Response) == "" {
			t.Error("empty response after 40 tokens")
		}
	})

	t.Run("generate stream", func(t *testing.T) {
		req := map[string]any{
			"model": srv.EndlessModel(), "prompt": "hi",
			"options": map[string]any{"num_predict": 5},
		}
		a := post(t, ctx, url+"/api/generate", req)
		status, raw := a.status, a.body
		if status != http.StatusOK {
			t.Fatalf("HTTP %d: %s", status, raw)
		}
		var chunks []generateResponse
		sc := bufio.NewScanner(bytes.NewReader(raw))
		for sc.Scan() {
			var c generateResponse
			if err := json.Unmarshal(sc.Bytes(), &c); err != nil {
				t.Fatalf("line %q: %v", sc.Text(), err)
			}
			chunks = append(chunks, c)
		}
		// One line per token, then a last line with done and the counts.
		if len(chunks) != 6 {
			t.Fatalf("%d lines, want 5 tokens + 1 final", len(chunks))
		}
		last := chunks[len(chunks)-1]
		if !last.Done || last.DoneReason != "length" || last.EvalCount == nil || *last.EvalCount != 5 {
			t.Errorf("last line = %+v", last)
		}
		for _, c := range chunks[:5] {
			if c.Done || c.EvalCount != nil || c.Response == "" {
				t.Errorf("token line = %+v, want a delta without counts", c)
			}
		}
	})

	t.Run("chat", func(t *testing.T) {
		chat := func(msgs ...map[string]string) chatResponse {
			req := map[string]any{
				"model": srv.Model(), "messages": msgs, "stream": false,
				"options": map[string]any{"seed": 1, "num_predict": 8},
			}
			return decode[chatResponse](t, post(t, ctx, url+"/api/chat", req))
		}
		user := map[string]string{"role": "user", "content": "hi"}
		got := chat(map[string]string{"role": "system", "content": "be brief"}, user)
		if !got.Done || got.Message == nil || got.Message.Role != "assistant" {
			t.Fatalf("answer = %+v", got)
		}
		if got.DoneReason != "stop" && got.DoneReason != "length" {
			t.Errorf("done_reason = %q", got.DoneReason)
		}
		if got.EvalCount == nil || got.PromptEvalCount == nil {
			t.Fatalf("counts missing: %+v", got)
		}
		// The template renders every message: the system message counts.
		if only := chat(user); *only.PromptEvalCount >= *got.PromptEvalCount {
			t.Errorf("prompt_eval_count with system %d, without %d: system message dropped", *got.PromptEvalCount, *only.PromptEvalCount)
		}
	})

	t.Run("embed list", func(t *testing.T) {
		req := map[string]any{"model": srv.Model(), "input": []string{"hello", "world wide", "hello"}}
		got := decode[embedResponse](t, post(t, ctx, url+"/api/embed", req))
		if len(got.Embeddings) != 3 {
			t.Fatalf("%d embeddings, want 3 (one per input)", len(got.Embeddings))
		}
		for i, e := range got.Embeddings {
			if len(e) != 64 {
				t.Errorf("embedding %d has %d dims, want 64", i, len(e))
			}
			var norm float64
			for _, v := range e {
				norm += v * v
			}
			if math.Abs(math.Sqrt(norm)-1) > 1e-3 {
				t.Errorf("embedding %d has norm %g, want 1 (Ollama normalizes)", i, math.Sqrt(norm))
			}
		}
		if slices.Equal(got.Embeddings[0], got.Embeddings[1]) {
			t.Error("different inputs, same embedding")
		}
		if !slices.Equal(got.Embeddings[0], got.Embeddings[2]) {
			t.Error("same input, different embeddings")
		}
		if got.PromptEvalCount == nil || *got.PromptEvalCount < 3 {
			t.Errorf("prompt_eval_count = %v", got.PromptEvalCount)
		}
	})

	t.Run("aliases", func(t *testing.T) {
		for _, name := range []string{"alias-a", "team/alias-b:v1"} {
			req := map[string]any{"model": name, "prompt": "x", "stream": false, "options": map[string]any{"num_predict": 2}}
			got := decode[generateResponse](t, post(t, ctx, url+"/api/generate", req))
			if !got.Done {
				t.Errorf("%s: not done", name)
			}
		}
	})

	t.Run("unknown model is 404", func(t *testing.T) {
		a := post(t, ctx, url+"/api/generate", map[string]any{"model": "nope", "prompt": "x", "stream": false})
		status, raw := a.status, a.body
		if status != http.StatusNotFound || !strings.Contains(string(raw), `"model 'nope' not found"`) {
			t.Errorf("HTTP %d: %s, want 404 model 'nope' not found", status, raw)
		}
	})

	// The OpenAI engine sends a batch of prompts as one /v1/completions call
	// with a list, and falls back to one call per prompt on a 400.
	t.Run("v1 completions list prompt is 400", func(t *testing.T) {
		a := post(t, ctx, url+"/v1/completions", map[string]any{
			"model": srv.Model(), "prompt": []string{"a", "b"}, "max_tokens": 4,
		})
		status, raw := a.status, a.body
		var e struct {
			Error struct {
				Message string `json:"message"`
				Type    string `json:"type"`
			} `json:"error"`
		}
		if err := json.Unmarshal(raw, &e); err != nil {
			t.Fatalf("decode %s: %v", raw, err)
		}
		if status != http.StatusBadRequest || e.Error.Type != "invalid_request_error" ||
			!strings.Contains(e.Error.Message, "cannot unmarshal array") {
			t.Errorf("HTTP %d: %s", status, raw)
		}
	})

	t.Run("v1 completions single prompt", func(t *testing.T) {
		got := decode[completionResponse](t, post(t, ctx, url+"/v1/completions", map[string]any{
			"model": srv.EndlessModel(), "prompt": "a", "max_tokens": 4,
		}))
		if got.Object != "text_completion" || len(got.Choices) != 1 || got.Choices[0].FinishReason != "length" {
			t.Fatalf("answer = %+v", got)
		}
		if got.Usage.CompletionTokens != 4 || got.Usage.PromptTokens < 1 {
			t.Errorf("usage = %+v", got.Usage)
		}
	})
}

// TestKillRestart takes the engine away in the middle of a generation and
// brings it back on the same URL.
func TestKillRestart(t *testing.T) {
	t.Parallel()
	srv := ollamatest.StartT(t, ollamatest.Options{NumParallel: 2, Aliases: []string{"kept"}})
	ctx := ctxT(t)
	pid := srv.Pid()
	if pid == 0 {
		t.Fatal("Pid = 0 while running")
	}

	// OLLAMA_NUM_PARALLEL and the default num_thread reached the runner
	// the server forked.
	if runners := groupCmdlines(t, pid); !slices.ContainsFunc(runners, func(c string) bool {
		return strings.Contains(c, " runner ") && strings.Contains(c, " --parallel 2 ") && strings.Contains(c, " --threads 1 ")
	}) {
		t.Errorf("no runner with --parallel 2 --threads 1 in the group: %q", runners)
	}

	// A generation that would run for long, streamed so we know it started.
	body, _ := json.Marshal(map[string]any{
		"model": srv.EndlessModel(), "prompt": "go", "options": map[string]any{"num_predict": 100000},
	})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL()+"/api/generate", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	if !sc.Scan() {
		t.Fatalf("no first token: %v", sc.Err())
	}

	srv.Kill()
	lines := 0
	for sc.Scan() {
		lines++
		if bytes.Contains(sc.Bytes(), []byte(`"done":true`)) {
			t.Fatal("generation finished although the engine was killed")
		}
	}
	if sc.Err() == nil {
		t.Errorf("stream ended cleanly after %d more lines, want a read error", lines)
	}
	if srv.Pid() != 0 {
		t.Errorf("Pid = %d after Kill, want 0", srv.Pid())
	}
	waitFor(t, 10*time.Second, "process group gone", func() bool { return len(groupCmdlines(t, pid)) == 0 })
	if resp, err := client.Get(srv.URL() + "/api/version"); err == nil {
		_ = resp.Body.Close()
		t.Error("server answers after Kill")
	}
	srv.Kill() // safe when not running

	if err := srv.Restart(ctx); err != nil {
		t.Fatalf("Restart: %v", err)
	}
	if srv.Pid() == 0 || srv.Pid() == pid {
		t.Errorf("Pid after Restart = %d, before %d", srv.Pid(), pid)
	}
	for _, model := range []string{srv.Model(), "kept"} {
		got := decode[generateResponse](t, post(t, ctx, srv.URL()+"/api/generate", map[string]any{
			"model": model, "prompt": "back", "stream": false, "options": map[string]any{"num_predict": 3},
		}))
		if !got.Done {
			t.Errorf("%s after Restart: %+v", model, got)
		}
	}

	// Restart also works on a running server (graceful stop, then start).
	before := srv.Pid()
	if err := srv.Restart(ctx); err != nil {
		t.Fatalf("Restart while running: %v", err)
	}
	waitFor(t, 10*time.Second, "old process group gone", func() bool { return len(groupCmdlines(t, before)) == 0 })
}

// TestStopOwnDir checks Start without a Dir: Stop removes what it made, is
// safe twice, and Restart after it fails.
func TestStopOwnDir(t *testing.T) {
	t.Parallel()
	ctx := ctxT(t)
	srv, err := ollamatest.Start(ctx, ollamatest.Options{NumParallel: 1})
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Dir(srv.LogPath())
	pid := srv.Pid()
	if _, err := os.Stat(filepath.Join(dir, "models")); err != nil {
		t.Fatalf("models dir: %v", err)
	}
	if err := srv.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("dir after Stop: %v, want gone", err)
	}
	waitFor(t, 10*time.Second, "process group gone", func() bool { return len(groupCmdlines(t, pid)) == 0 })
	if err := srv.Stop(ctx); err != nil {
		t.Errorf("second Stop: %v", err)
	}
	if err := srv.Restart(ctx); err == nil {
		t.Error("Restart after Stop: want an error")
	}
}

func TestMissingBinary(t *testing.T) {
	// Not parallel: it sets the environment.
	t.Setenv(ollamatest.BinEnv, filepath.Join(t.TempDir(), "ollama"))
	_, err := ollamatest.Start(ctxT(t), ollamatest.Options{})
	if !errors.Is(err, ollamatest.ErrNoBinary) || !strings.Contains(err.Error(), "run `make ollama`") {
		t.Errorf("err = %v, want ErrNoBinary saying run `make ollama`", err)
	}
}

// TestBinaryFromRepoRoot checks the default: .cache/bin/ollama under the
// nearest directory above the working directory that holds go.mod.
func TestBinaryFromRepoRoot(t *testing.T) {
	// Not parallel: it sets the environment and the working directory.
	t.Setenv(ollamatest.BinEnv, "")
	tests := []struct {
		name    string
		binary  string // content of .cache/bin/ollama; "" for none
		mode    os.FileMode
		noBin   bool     // want ErrNoBinary
		errHave []string // want these in the error
	}{
		{name: "missing", noBin: true, errHave: []string{".cache/bin/ollama", "run `make ollama`"}},
		{name: "not executable", binary: "#!/bin/sh\n", mode: 0o644, noBin: true, errHave: []string{"run `make ollama`"}},
		{
			name:   "found, and its log tail is in the error when it dies",
			binary: "#!/bin/sh\necho \"fake ollama: $1 failed\" >&2\nexit 1\n", mode: 0o755,
			errHave: []string{"ollama serve exited before it answered: exit status 1", "fake ollama: serve failed"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			if err := os.WriteFile(filepath.Join(root, "go.mod"), []byte("module x\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			if tc.binary != "" {
				bin := filepath.Join(root, ".cache", "bin", "ollama")
				if err := os.MkdirAll(filepath.Dir(bin), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(bin, []byte(tc.binary), tc.mode); err != nil {
					t.Fatal(err)
				}
			}
			sub := filepath.Join(root, "a", "b")
			if err := os.MkdirAll(sub, 0o755); err != nil {
				t.Fatal(err)
			}
			t.Chdir(sub)

			_, err := ollamatest.Start(ctxT(t), ollamatest.Options{Dir: t.TempDir()})
			if err == nil {
				t.Fatal("Start: want an error")
			}
			if got := errors.Is(err, ollamatest.ErrNoBinary); got != tc.noBin {
				t.Errorf("errors.Is(ErrNoBinary) = %v, want %v: %v", got, tc.noBin, err)
			}
			for _, want := range tc.errHave {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error lacks %q: %v", want, err)
				}
			}
		})
	}
}

// groupCmdlines returns the command lines of the live (not zombie)
// processes in process group pgid, read from /proc.
func groupCmdlines(t *testing.T, pgid int) []string {
	t.Helper()
	entries, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatalf("read /proc: %v", err)
	}
	var out []string
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue // gone meanwhile
		}
		// pid (comm) state ppid pgrp ...; comm may hold spaces.
		fields := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
		if len(fields) < 3 || fields[0] == "Z" || fields[2] != strconv.Itoa(pgid) {
			continue
		}
		cmdline, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		out = append(out, strconv.Itoa(pid)+": "+strings.ReplaceAll(string(cmdline), "\x00", " "))
	}
	return out
}

// waitFor polls cond until it holds or the timeout passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), timeout)
	defer cancel()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		case <-tick.C:
		}
	}
}
