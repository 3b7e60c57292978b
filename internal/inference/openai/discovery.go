package openai

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/secret"
)

// What the engine says about itself: optional abilities the worker finds
// with type assertions.

// probeTimeout bounds each discovery call (one GET of /props, /info or
// /metrics), so that a server which does not answer them quickly cannot
// hold up the worker.
const probeTimeout = 3 * time.Second

// maxProbeBody bounds what a discovery call reads. llama.cpp's /props
// carries the chat template, vLLM's /metrics a page of histograms; both
// stay far below this.
const maxProbeBody = 8 << 20

// maxModelsBody bounds a /v1/models answer (hosted gateways list
// hundreds of models).
const maxModelsBody = 16 << 20

// TakesList reports whether ONE engine call can carry several requests of
// kind as a list, so that the caller should batch them rather than send
// them one per call:
//
//   - Embed: true, /v1/embeddings takes a list input.
//   - Generate: true when prompts go as one /v1/completions call with a
//     list of prompts: always with BatchList, never with BatchSingle, and
//     with BatchAuto until the server has refused a list. While auto mode
//     has not yet learnt the answer it says true, because only a list call
//     can teach it: if the server refuses that first list, Infer falls back
//     to single calls within the same call (every request still gets its
//     answer) and TakesList says false from then on (see ListSupported).
//     Streaming prompts never go as a list, whatever this says.
//   - Chat: false, /v1/chat/completions takes one conversation per call.
//
// It does no I/O and is safe for concurrent use.
func (e *Engine) TakesList(kind inference.Kind) bool {
	switch kind {
	case inference.Embed:
		return true
	case inference.Generate:
		return e.useList()
	default:
		return false
	}
}

// Slots returns how many requests the server runs at once (its parallel
// sequences), where the server says it, and which answer said it:
//
//   - "llama.cpp /props": the llama.cpp server's GET /props total_slots
//     (its --parallel).
//   - "tgi /info": TGI's GET /info max_concurrent_requests (beyond which
//     TGI answers 429), or its max_batch_size when that is set and smaller.
//
// Both live at the server's root, not under /v1. The probes run in that
// order, each bounded by a short timeout, and each sends the API key as
// every call does.
//
// n is a count of requests (never tokens). n = 0 with a nil error means the
// server cannot say: vLLM (its /metrics has no max_num_seqs, the info gauge
// vllm:cache_config_info carries the KV-cache settings only; Queue reads
// its running/waiting gauges, which sizing.Adapter turns into slots),
// Ollama's /v1, hosted APIs, or an answer that is absent (4xx), not JSON or
// lacks the field. source is "" exactly when n is 0. err is non-nil only
// when the server could not be reached, timed out, or answered 5xx other
// than 501 (llama.cpp answers 503 while it loads the model), so asking
// again later may help; it is classified like every other engine error
// (inference.Classify) and never holds the key.
func (e *Engine) Slots(ctx context.Context) (n int, source string, err error) {
	probes := []struct {
		source, path string
		parse        func([]byte) int
	}{
		{"llama.cpp /props", "/props", llamaSlots},
		{"tgi /info", "/info", tgiSlots},
	}
	for _, p := range probes {
		status, body, err := e.probe(ctx, p.path)
		if err != nil {
			return 0, "", err
		}
		if status/100 != 2 {
			continue
		}
		if n := p.parse(body); n > 0 {
			return n, p.source, nil
		}
	}
	return 0, "", nil
}

// llamaSlots reads total_slots from a llama.cpp server's GET /props. The
// answer's shape (tools/server/README.md in ggml-org/llama.cpp, "GET
// /props"):
//
//	{"default_generation_settings": {...}, "total_slots": 1,
//	 "model_path": "...", "chat_template": "...", "build_info": "..."}
func llamaSlots(body []byte) int {
	var v struct {
		TotalSlots int `json:"total_slots"`
	}
	if json.Unmarshal(body, &v) != nil {
		return 0
	}
	return max(v.TotalSlots, 0)
}

// tgiSlots reads TGI's GET /info. The answer's shape (struct Info in
// huggingface/text-generation-inference router/src/lib.rs):
//
//	{"model_id": "bigscience/blomm-560m", ..., "max_concurrent_requests": 128,
//	 "max_best_of": 2, ..., "max_batch_size": null, ..., "version": "0.5.0"}
//
// max_concurrent_requests is how many requests the router admits;
// max_batch_size, when set, how many of them run in one batch.
func tgiSlots(body []byte) int {
	var v struct {
		MaxConcurrent int  `json:"max_concurrent_requests"`
		MaxBatchSize  *int `json:"max_batch_size"`
	}
	if json.Unmarshal(body, &v) != nil || v.MaxConcurrent <= 0 {
		return 0
	}
	if v.MaxBatchSize != nil && *v.MaxBatchSize > 0 && *v.MaxBatchSize < v.MaxConcurrent {
		return *v.MaxBatchSize
	}
	return v.MaxConcurrent
}

// Queue reads the server's own scheduler gauges from GET /metrics (at the
// server's root), for a caller that adapts how many requests it keeps in
// flight to the server's wait queue. running is the number of requests the
// server is running now, waiting the number it holds queued; both are
// request counts, summed over the series (vLLM labels one per engine and
// model). The gauges read, by server:
//
//   - vLLM: vllm:num_requests_running, vllm:num_requests_waiting
//   - llama.cpp (started with --metrics): llamacpp:requests_processing,
//     llamacpp:requests_deferred
//   - TGI: tgi_batch_current_size, tgi_queue_size (its exporter shows a
//     gauge once it has been set, so possibly not before the first request)
//
// ok is false with a nil error when the server has no /metrics (404, or
// llama.cpp's 501 without --metrics) or shows none of these pairs; the
// numbers are then 0. err is non-nil only when the server could not be
// reached, timed out (after one probe timeout at most) or answered 5xx
// other than 501. Each call is one GET; the caller sets the pace.
func (e *Engine) Queue(ctx context.Context) (running, waiting int, ok bool, err error) {
	status, body, err := e.probe(ctx, "/metrics")
	if err != nil || status/100 != 2 {
		return 0, 0, false, err
	}
	g := parseGauges(body)
	for _, pair := range [][2]string{
		{"vllm:num_requests_running", "vllm:num_requests_waiting"},
		{"llamacpp:requests_processing", "llamacpp:requests_deferred"},
		{"tgi_batch_current_size", "tgi_queue_size"},
	} {
		r, okR := g[pair[0]]
		w, okW := g[pair[1]]
		if okR && okW {
			return int(math.Round(r)), int(math.Round(w)), true, nil
		}
	}
	return 0, 0, false, nil
}

// queueGauges are the metric names parseGauges keeps.
var queueGauges = map[string]bool{
	"vllm:num_requests_running":    true,
	"vllm:num_requests_waiting":    true,
	"llamacpp:requests_processing": true,
	"llamacpp:requests_deferred":   true,
	"tgi_batch_current_size":       true,
	"tgi_queue_size":               true,
}

// parseGauges sums, per name in queueGauges, the samples of a Prometheus
// text exposition (version 0.0.4): lines `name{labels} value [timestamp]`,
// comments starting with '#'. Malformed lines, and values that are not
// finite non-negative numbers, are skipped.
func parseGauges(body []byte) map[string]float64 {
	out := map[string]float64{}
	sc := bufio.NewScanner(bytes.NewReader(body))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		name, value, ok := parseSample(sc.Text())
		if !ok || !queueGauges[name] {
			continue
		}
		out[name] += value
	}
	return out
}

// parseSample splits one exposition line into its metric name and value.
func parseSample(line string) (name string, value float64, ok bool) {
	line = strings.TrimSpace(line)
	if line == "" || line[0] == '#' {
		return "", 0, false
	}
	end := strings.IndexAny(line, "{ \t")
	if end <= 0 {
		return "", 0, false
	}
	name, rest := line[:end], line[end:]
	if rest[0] == '{' {
		j := labelsEnd(rest)
		if j < 0 {
			return "", 0, false
		}
		rest = rest[j+1:]
	}
	fields := strings.Fields(rest)
	if len(fields) == 0 {
		return "", 0, false
	}
	v, err := strconv.ParseFloat(fields[0], 64)
	if err != nil || math.IsNaN(v) || math.IsInf(v, 0) || v < 0 {
		return "", 0, false
	}
	return name, v, true
}

// labelsEnd returns the index of the '}' that closes the label set s
// starts with, or -1. A label value may hold '}' or an escaped '"'.
func labelsEnd(s string) int {
	quoted := false
	for i := 1; i < len(s); i++ {
		switch c := s[i]; {
		case quoted && c == '\\':
			i++
		case c == '"':
			quoted = !quoted
		case !quoted && c == '}':
			return i
		}
	}
	return -1
}

// Models lists the models the server serves: the ids of GET /v1/models
// (data[].id), in the server's order. For Ollama's /v1 they are names with
// their tag ("tiny:latest"); see inference.HasModel to match a configured
// name against them. Errors are classified like every other engine error
// (a 404 is "model_not_found" in the sense that the URL has no model list;
// 401/403 a wrong key) and never hold the key.
func (e *Engine) Models(ctx context.Context) ([]string, error) {
	resp, err := e.getResponse(ctx, e.base+"/models")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		msg := errorMessage(resp.Body)
		return nil, inference.Classify(resp.StatusCode, msg, fmt.Errorf("GET /v1/models: %s: %s (is the engine URL an OpenAI-compatible server?)", resp.Status, secret.Scrub(msg, e.key)))
	}
	var list struct {
		Data []struct {
			ID string `json:"id"`
		} `json:"data"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxModelsBody)).Decode(&list); err != nil {
		return nil, inference.Classify(0, "", fmt.Errorf("decode the GET /v1/models answer (is the engine URL an OpenAI-compatible server?): %w", err))
	}
	ids := make([]string, 0, len(list.Data))
	for _, m := range list.Data {
		if m.ID != "" {
			ids = append(ids, m.ID)
		}
	}
	return ids, nil
}

// root is the server's root URL: the engine URL without its /v1, where
// llama.cpp, TGI and vLLM serve /props, /info and /metrics.
func (e *Engine) root() string { return strings.TrimSuffix(e.base, "/v1") }

// probe GETs path at the server's root within probeTimeout and returns the
// status and body. A 5xx is an error, except 501 Not Implemented: the
// llama.cpp server answers that to /metrics when started without
// --metrics, so it means "not here". Any other status is returned for the
// caller to judge, with the body of a 2xx only.
func (e *Engine) probe(ctx context.Context, path string) (int, []byte, error) {
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	resp, err := e.getResponse(ctx, e.root()+path)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 500 && resp.StatusCode != http.StatusNotImplemented {
		msg := errorMessage(resp.Body)
		return 0, nil, inference.Classify(resp.StatusCode, msg, fmt.Errorf("GET %s: %s: %s", path, resp.Status, secret.Scrub(msg, e.key)))
	}
	if resp.StatusCode/100 != 2 {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		return resp.StatusCode, nil, nil
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxProbeBody))
	if err != nil {
		return 0, nil, inference.Classify(0, "", fmt.Errorf("read GET %s: %w", path, scrubbed{err, e.key}))
	}
	return resp.StatusCode, body, nil
}

// getResponse sends GET url with the API key; a failure to get any answer
// is classified.
func (e *Engine) getResponse(ctx context.Context, url string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, &inference.Error{Kind: inference.Permanent, Code: "engine_rejected", Err: err}
	}
	if !e.key.IsZero() {
		req.Header.Set("Authorization", "Bearer "+e.key.Reveal())
	}
	resp, err := e.client.Do(req)
	if err != nil {
		return nil, inference.Classify(0, "", scrubbed{err, e.key})
	}
	return resp, nil
}
