package openai_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/inference/openai"
	"github.com/sous-run/sous/internal/secret"
)

// reply is one canned answer of a fake server.
type reply struct {
	status int
	ctype  string
	body   string
}

func jsonReply(status int, body string) reply { return reply{status, "application/json", body} }

// The answers below are the servers' own wire formats, taken from their
// source and docs:
//
//   - llama.cpp server: ggml-org/llama.cpp tools/server/README.md, "GET
//     /props" (total_slots), "GET /v1/models", "GET /metrics" (gauges
//     llamacpp:requests_processing and llamacpp:requests_deferred, written
//     by tools/server/server.cpp as "# HELP", "# TYPE" and "name value"
//     lines), and its "API errors": 501 not_supported_error when /metrics
//     is disabled, 503 "Loading model" while the model loads.
//   - TGI: huggingface/text-generation-inference router/src/lib.rs, struct
//     Info (GET /info); gauges tgi_batch_current_size and tgi_queue_size
//     (router/src/infer, queue.rs). TGI's router (axum) answers an unknown
//     path with an empty 404.
//   - vLLM: vllm/v1/metrics/loggers.py (PrometheusStatLogger: gauges
//     vllm:num_requests_running and vllm:num_requests_waiting labelled
//     model_name and engine, one series per engine; the info gauge
//     vllm:cache_config_info carries CacheConfig only, no max_num_seqs);
//     ModelList/ModelCard in vllm/entrypoints/openai/protocol.py; FastAPI's
//     404 {"detail":"Not Found"}.
//   - Ollama 0.6.5's /v1: openai.ListCompletion (GET /v1/models) in
//     github.com/ollama/ollama@v0.6.5 openai/openai.go; gin's plain-text
//     "404 page not found".
var (
	llamaProps   = jsonReply(200, `{"default_generation_settings":{"id":0,"id_task":-1,"n_ctx":1024,"speculative":false,"is_processing":false,"params":{"n_predict":-1,"seed":4294967295,"temperature":0.800000011920929,"samplers":["dry","top_k","typ_p","top_p","min_p","xtc","temperature"]},"prompt":"","next_token":{"has_next_token":true,"has_new_line":false,"n_remain":-1,"n_decoded":0,"stopping_word":""}},"total_slots":4,"model_path":"../models/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf","chat_template":"{{ bos_token }}...","modalities":{"vision":false},"build_info":"b5500-abcdef0"}`)
	llamaModels  = jsonReply(200, `{"object":"list","data":[{"id":"../models/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf","object":"model","created":1735142223,"owned_by":"llamacpp","meta":{"vocab_type":2,"n_vocab":128256,"n_ctx_train":131072,"n_embd":4096,"n_params":8030261312,"size":4912898304}}]}`)
	llamaMetrics = reply{200, "text/plain; version=0.0.4", `# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 1207
# HELP llamacpp:prompt_tokens_seconds Average prompt throughput in tokens/s.
# TYPE llamacpp:prompt_tokens_seconds gauge
llamacpp:prompt_tokens_seconds 712.5
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 4
# HELP llamacpp:requests_deferred Number of requests deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 9
`}
	llamaNoMetrics = jsonReply(501, `{"error":{"code":501,"message":"This server does not support metrics endpoint.","type":"not_supported_error"}}`)
	llamaLoading   = jsonReply(503, `{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}`)

	tgiInfo       = jsonReply(200, `{"model_id":"bigscience/blomm-560m","model_sha":"e985a63cdc139290c5f700ff1929f0b5942cced2","model_dtype":"torch.float16","model_device_type":"cuda","model_pipeline_tag":"text-generation","max_concurrent_requests":128,"max_best_of":2,"max_stop_sequences":4,"max_input_length":1024,"max_total_tokens":2048,"waiting_served_ratio":1.2,"max_batch_total_tokens":32000,"max_waiting_tokens":20,"max_batch_size":null,"validation_workers":2,"version":"0.5.0","sha":null,"docker_label":null}`)
	tgiInfoBatch  = jsonReply(200, `{"model_id":"bigscience/blomm-560m","max_concurrent_requests":128,"max_batch_total_tokens":32000,"max_batch_size":32,"version":"2.0.4"}`)
	tgiMetrics    = reply{200, "text/plain", "# TYPE tgi_queue_size gauge\ntgi_queue_size 3\n\n# TYPE tgi_batch_current_size gauge\ntgi_batch_current_size 16\n\n# TYPE tgi_request_count counter\ntgi_request_count 250\n"}
	tgiNotFound   = reply{404, "", ""}
	vllmNotFound  = jsonReply(404, `{"detail":"Not Found"}`)
	vllmModelList = jsonReply(200, `{"object":"list","data":[{"id":"Qwen/Qwen3-0.6B","object":"model","created":1735142223,"owned_by":"vllm","root":"Qwen/Qwen3-0.6B","parent":null,"max_model_len":40960,"permission":[{"id":"modelperm-1","object":"model_permission","created":1735142223,"allow_create_engine":false,"allow_sampling":true,"allow_logprobs":true,"allow_search_indices":false,"allow_view":true,"allow_fine_tuning":false,"organization":"*","group":null,"is_blocking":false}]}]}`)
	// Two engines (data parallel): one series each.
	vllmMetrics = reply{200, "text/plain; version=0.0.4; charset=utf-8", `# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 12345.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen3-0.6B"} 3.0
vllm:num_requests_running{engine="1",model_name="Qwen/Qwen3-0.6B"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen3-0.6B"} 7.0
vllm:num_requests_waiting{engine="1",model_name="Qwen/Qwen3-0.6B"} 0.0
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",engine="0",gpu_memory_utilization="0.9",num_gpu_blocks="27798"} 1.0
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.3",model_name="Qwen/Qwen3-0.6B"} 0.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="Qwen/Qwen3-0.6B"} 12.5
`}

	ollamaModels   = jsonReply(200, `{"object":"list","data":[{"id":"tiny-endless:latest","object":"model","created":1764230000,"owned_by":"library"},{"id":"tiny:latest","object":"model","created":1764229990,"owned_by":"library"}]}`)
	ollamaNotFound = reply{404, "text/plain", "404 page not found"}
	htmlPage       = reply{200, "text/html; charset=utf-8", "<!doctype html><html><body>llama.cpp</body></html>"}
	garbage        = reply{200, "application/json", `{"total_slots": "many", "max_concurrent_requests": [`}
)

// fake serves canned replies by path and records what it was asked.
type fake struct {
	routes   map[string]reply
	notFound reply

	mu    sync.Mutex
	paths []string
	auth  []string
}

func (f *fake) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	f.paths = append(f.paths, r.URL.Path)
	f.auth = append(f.auth, r.Header.Get("Authorization"))
	f.mu.Unlock()
	rep, ok := f.routes[r.URL.Path]
	if !ok {
		rep = f.notFound
	}
	if rep.ctype != "" {
		w.Header().Set("Content-Type", rep.ctype)
	}
	w.WriteHeader(rep.status)
	fmt.Fprint(w, rep.body)
}

func (f *fake) asked() ([]string, []string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.paths), slices.Clone(f.auth)
}

// serve starts f and returns an engine whose URL is the server's plus
// suffix ("/v1", "", "/llama/v1").
func serve(t *testing.T, f *fake, suffix string, key string) *openai.Engine {
	t.Helper()
	if f.notFound.status == 0 {
		f.notFound = vllmNotFound
	}
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	e, err := openai.New(openai.Config{URL: srv.URL + suffix, APIKey: secret.Value(key)})
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func TestSlots(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name       string
		routes     map[string]reply
		notFound   reply
		suffix     string
		wantN      int
		wantSource string
	}{
		{"llama.cpp", map[string]reply{"/props": llamaProps}, vllmNotFound, "/v1", 4, "llama.cpp /props"},
		{"llama.cpp, URL without /v1", map[string]reply{"/props": llamaProps}, vllmNotFound, "", 4, "llama.cpp /props"},
		{"llama.cpp behind a path prefix", map[string]reply{"/llama/props": llamaProps}, vllmNotFound, "/llama/v1", 4, "llama.cpp /props"},
		{"tgi", map[string]reply{"/info": tgiInfo}, tgiNotFound, "/v1", 128, "tgi /info"},
		{"tgi with max_batch_size", map[string]reply{"/info": tgiInfoBatch}, tgiNotFound, "/v1", 32, "tgi /info"},
		{"vllm cannot say", map[string]reply{"/metrics": vllmMetrics, "/v1/models": vllmModelList}, vllmNotFound, "/v1", 0, ""},
		{"ollama cannot say", map[string]reply{"/v1/models": ollamaModels}, ollamaNotFound, "/v1", 0, ""},
		{"html and garbage", map[string]reply{"/props": htmlPage, "/info": garbage}, vllmNotFound, "/v1", 0, ""},
		{"props without total_slots", map[string]reply{"/props": jsonReply(200, `{"model_path":"m.gguf"}`)}, vllmNotFound, "/v1", 0, ""},
		{"props with zero slots falls through to info", map[string]reply{"/props": jsonReply(200, `{"total_slots":0}`), "/info": tgiInfo}, vllmNotFound, "/v1", 128, "tgi /info"},
		{"negative counts", map[string]reply{"/props": jsonReply(200, `{"total_slots":-1}`), "/info": jsonReply(200, `{"max_concurrent_requests":-5}`)}, vllmNotFound, "/v1", 0, ""},
		{"unauthorized probes", map[string]reply{"/props": jsonReply(401, `{"error":{"code":401,"message":"Invalid API Key","type":"authentication_error"}}`)}, vllmNotFound, "/v1", 0, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f := &fake{routes: tt.routes, notFound: tt.notFound}
			e := serve(t, f, tt.suffix, "sk-slots-key")
			n, source, err := e.Slots(context.Background())
			if err != nil || n != tt.wantN || source != tt.wantSource {
				t.Fatalf("Slots = %d, %q, %v; want %d, %q, nil", n, source, err, tt.wantN, tt.wantSource)
			}
			paths, auth := f.asked()
			for _, p := range paths {
				if strings.HasPrefix(strings.TrimPrefix(p, "/llama"), "/v1/") {
					t.Errorf("Slots asked %s: the probes live at the server's root", p)
				}
			}
			for _, a := range auth {
				if a != "Bearer sk-slots-key" {
					t.Errorf("probe sent Authorization %q", a)
				}
			}
		})
	}
}

func TestSlotsErrors(t *testing.T) {
	t.Parallel()
	t.Run("model loading (503) is a retryable error", func(t *testing.T) {
		t.Parallel()
		e := serve(t, &fake{routes: map[string]reply{"/props": llamaLoading}}, "/v1", "")
		n, source, err := e.Slots(context.Background())
		if n != 0 || source != "" || inference.KindOf(err) != inference.Retryable || !strings.Contains(err.Error(), "Loading model") {
			t.Fatalf("Slots = %d, %q, %v", n, source, err)
		}
	})
	t.Run("a 5xx never shows the key", func(t *testing.T) {
		t.Parallel()
		echo := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, "upstream rejected "+r.Header.Get("Authorization"), http.StatusBadGateway)
		})
		srv := httptest.NewServer(echo)
		defer srv.Close()
		e, _ := openai.New(openai.Config{URL: srv.URL, APIKey: "sk-never-shown"})
		_, _, err := e.Slots(context.Background())
		if err == nil || strings.Contains(err.Error(), "sk-never-shown") {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("unreachable", func(t *testing.T) {
		t.Parallel()
		srv := httptest.NewServer(http.NotFoundHandler())
		url := srv.URL
		srv.Close()
		e, _ := openai.New(openai.Config{URL: url, APIKey: "sk-never-shown"})
		n, _, err := e.Slots(context.Background())
		if n != 0 || inference.CodeOf(err) != "engine_unavailable" || strings.Contains(err.Error(), "sk-never-shown") {
			t.Fatalf("Slots = %d, %v (%s)", n, err, inference.CodeOf(err))
		}
	})
	t.Run("a hung server times out", func(t *testing.T) {
		t.Parallel()
		block := make(chan struct{})
		srv := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { <-block }))
		defer srv.Close()
		defer close(block)
		e, _ := openai.New(openai.Config{URL: srv.URL})
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		_, _, err := e.Slots(ctx)
		if inference.CodeOf(err) != "engine_timeout" {
			t.Fatalf("err = %v (%s)", err, inference.CodeOf(err))
		}
	})
}

func TestQueue(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name             string
		metrics          reply
		running, waiting int
		ok               bool
	}{
		{"vllm, two engines", vllmMetrics, 5, 7, true},
		{"llama.cpp", llamaMetrics, 4, 9, true},
		{"tgi", tgiMetrics, 16, 3, true},
		{"llama.cpp without --metrics (501)", llamaNoMetrics, 0, 0, false},
		{"no /metrics (404)", vllmNotFound, 0, 0, false},
		{"html", htmlPage, 0, 0, false},
		{"other metrics only", reply{200, "text/plain", "# TYPE up gauge\nup 1\n"}, 0, 0, false},
		{"running without waiting", reply{200, "text/plain", "vllm:num_requests_running{engine=\"0\"} 3.0\n"}, 0, 0, false},
		{"odd values skipped", reply{200, "text/plain", "vllm:num_requests_running 2\nvllm:num_requests_running{a=\"}\\\" 9\"} NaN\nvllm:num_requests_waiting -1\nvllm:num_requests_waiting 1.6 1712345678000\n"}, 2, 2, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := serve(t, &fake{routes: map[string]reply{"/metrics": tt.metrics}}, "/v1", "")
			running, waiting, ok, err := e.Queue(context.Background())
			if err != nil || running != tt.running || waiting != tt.waiting || ok != tt.ok {
				t.Fatalf("Queue = %d, %d, %v, %v; want %d, %d, %v, nil", running, waiting, ok, err, tt.running, tt.waiting, tt.ok)
			}
		})
	}
	t.Run("5xx is an error", func(t *testing.T) {
		t.Parallel()
		e := serve(t, &fake{routes: map[string]reply{"/metrics": jsonReply(500, `{"detail":"Internal Server Error"}`)}}, "/v1", "")
		if _, _, ok, err := e.Queue(context.Background()); ok || inference.KindOf(err) != inference.Retryable {
			t.Fatalf("ok = %v, err = %v", ok, err)
		}
	})
	t.Run("unreachable is an error", func(t *testing.T) {
		t.Parallel()
		e, _ := openai.New(openai.Config{URL: "http://127.0.0.1:1/v1"})
		if _, _, ok, err := e.Queue(context.Background()); ok || inference.CodeOf(err) != "engine_unavailable" {
			t.Fatalf("ok = %v, err = %v", ok, err)
		}
	})
}

func TestModels(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		models reply
		want   []string
	}{
		{"vllm", vllmModelList, []string{"Qwen/Qwen3-0.6B"}},
		{"llama.cpp", llamaModels, []string{"../models/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf"}},
		{"ollama", ollamaModels, []string{"tiny-endless:latest", "tiny:latest"}},
		{"empty list", jsonReply(200, `{"object":"list","data":[]}`), []string{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f := &fake{routes: map[string]reply{"/v1/models": tt.models}}
			e := serve(t, f, "", "sk-models")
			got, err := e.Models(context.Background())
			if err != nil || !slices.Equal(got, tt.want) {
				t.Fatalf("Models = %q, %v; want %q", got, err, tt.want)
			}
			if _, auth := f.asked(); auth[0] != "Bearer sk-models" {
				t.Fatalf("Authorization %q", auth[0])
			}
		})
	}
	errs := []struct {
		name   string
		models reply
		code   string
	}{
		{"wrong key", jsonReply(401, `{"error":{"code":401,"message":"Invalid API Key sk-models","type":"authentication_error"}}`), "engine_unauthorized"},
		{"no model list", ollamaNotFound, "model_not_found"},
		{"html", htmlPage, "engine_unavailable"},
		{"loading", llamaLoading, "engine_error"},
	}
	for _, tt := range errs {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := serve(t, &fake{routes: map[string]reply{"/v1/models": tt.models}}, "/v1", "sk-models")
			got, err := e.Models(context.Background())
			if got != nil || inference.CodeOf(err) != tt.code {
				t.Fatalf("Models = %q, %v (%s); want code %s", got, err, inference.CodeOf(err), tt.code)
			}
			if strings.Contains(err.Error(), "sk-models") {
				t.Fatalf("the key in an error: %v", err)
			}
		})
	}
	t.Run("unreachable", func(t *testing.T) {
		t.Parallel()
		e, _ := openai.New(openai.Config{URL: "http://127.0.0.1:1/v1", APIKey: "sk-models"})
		if _, err := e.Models(context.Background()); inference.CodeOf(err) != "engine_unavailable" {
			t.Fatalf("err = %v", err)
		}
	})
}

func TestTakesList(t *testing.T) {
	t.Parallel()
	kinds := []inference.Kind{inference.Generate, inference.Chat, inference.Embed, 0}
	modes := []struct {
		mode string
		want []bool // per kind above
	}{
		{openai.BatchList, []bool{true, false, true, false}},
		{openai.BatchSingle, []bool{false, false, true, false}},
		{openai.BatchAuto, []bool{true, false, true, false}}, // not yet known: a list call is how auto learns
	}
	for _, m := range modes {
		e, _ := setup(t, openai.Config{BatchPrompts: m.mode})
		for i, k := range kinds {
			if got := e.TakesList(k); got != m.want[i] {
				t.Errorf("mode %s: TakesList(%s) = %v, want %v", m.mode, k, got, m.want[i])
			}
		}
	}

	t.Run("auto, lists accepted", func(t *testing.T) {
		t.Parallel()
		e, _ := setup(t, openai.Config{})
		if _, err := e.Infer(context.Background(), prompts("m", 2)); err != nil {
			t.Fatal(err)
		}
		if e.ListSupported() != 1 || !e.TakesList(inference.Generate) {
			t.Fatalf("after an accepted list: state %d, TakesList %v", e.ListSupported(), e.TakesList(inference.Generate))
		}
	})
	t.Run("auto, lists refused", func(t *testing.T) {
		t.Parallel()
		// Ollama 0.6.5's answer to a prompt list: its CompletionsMiddleware
		// binds "prompt" to a string and answers NewError(400, err.Error())
		// (openai/openai.go); see also TestRealOllamaV1.
		refuse := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			b, _ := io.ReadAll(r.Body)
			if strings.Contains(string(b), `"prompt":[`) {
				w.WriteHeader(http.StatusBadRequest)
				fmt.Fprint(w, `{"error":{"message":"json: cannot unmarshal array into Go struct field CompletionRequest.prompt of type string","type":"invalid_request_error","param":null,"code":null}}`)
				return
			}
			fmt.Fprint(w, `{"choices":[{"index":0,"text":"ok","finish_reason":"stop"}]}`)
		})
		srv := httptest.NewServer(refuse)
		defer srv.Close()
		e, _ := openai.New(openai.Config{URL: srv.URL})
		if !e.TakesList(inference.Generate) {
			t.Fatal("auto mode says no lists before it has tried one")
		}
		res, err := e.Infer(context.Background(), prompts("m", 2))
		if err != nil || res[0].Err != nil || res[1].Response.Text != "ok" {
			t.Fatalf("fallback: %+v %v", res, err)
		}
		if e.TakesList(inference.Generate) || !e.TakesList(inference.Embed) {
			t.Fatalf("after a refused list: TakesList(generate) %v, (embed) %v", e.TakesList(inference.Generate), e.TakesList(inference.Embed))
		}
	})
}

// The worker finds these abilities by type assertion: the signatures are
// the contract.
var _ interface {
	TakesList(inference.Kind) bool
	Slots(context.Context) (int, string, error)
	Queue(context.Context) (int, int, bool, error)
	Models(context.Context) ([]string, error)
} = (*openai.Engine)(nil)
