package wire_test

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/santhosh-tekuri/jsonschema/v6"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/wire"
)

var now = time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)

const weatherTool = `{"type":"function","function":{"name":"get_weather","description":"weather of a city","parameters":{"type":"object","required":["city"],"properties":{"city":{"type":"string"}}}}}`

func limits() wire.Limits {
	return wire.Limits{MaxBodyBytes: 4096, MaxPromptBytes: 1024, MaxNumPredict: 256, DefaultModel: "tiny", AllowedModels: []string{"tiny", "big"}}
}

func schema(t testing.TB, name string) *jsonschema.Schema {
	t.Helper()
	c := jsonschema.NewCompiler()
	c.AssertFormat()
	path, err := filepath.Abs(filepath.Join("..", "..", "docs", "schemas", name))
	if err != nil {
		t.Fatal(err)
	}
	s, err := c.Compile(path)
	if err != nil {
		t.Fatalf("compile %s: %v", name, err)
	}
	return s
}

func validates(t testing.TB, s *jsonschema.Schema, body []byte) error {
	t.Helper()
	v, err := jsonschema.UnmarshalJSON(strings.NewReader(string(body)))
	if err != nil {
		return err
	}
	return s.Validate(v)
}

func TestDecodeRequest(t *testing.T) {
	t.Parallel()
	reqSchema := schema(t, "request.schema.json")
	tests := []struct {
		name   string
		body   string
		ctype  string
		reason string // "" = valid
		// schemaAgrees is false where the JSON Schema cannot express the rule
		// (limits that are worker configuration, UTF-8, deadlines).
		schemaAgrees bool
		check        func(t *testing.T, d *wire.Decoded)
	}{
		{name: "prompt", body: `{"prompt":"hi"}`, schemaAgrees: true, check: func(t *testing.T, d *wire.Decoded) {
			if d.Req.Kind != inference.Generate || d.Req.Model != "tiny" || d.ID != "msg-1" {
				t.Errorf("got %+v", d)
			}
			if d.Req.Options["num_predict"] != int64(256) {
				t.Errorf("num_predict defaults to the limit, got %v", d.Req.Options["num_predict"])
			}
		}},
		{name: "chat with options", body: `{"id":"a","model":"big","messages":[{"role":"user","content":"hi"}],"options":{"temperature":0.5,"seed":7,"num_predict":8,"stop":["\n"]},"format":"json","stream":true}`, schemaAgrees: true, check: func(t *testing.T, d *wire.Decoded) {
			if d.Req.Kind != inference.Chat || d.ID != "a" || d.Req.Model != "big" || !d.Stream {
				t.Errorf("got %+v", d)
			}
			if d.Req.Options["seed"] != int64(7) || d.Req.Options["temperature"] != 0.5 || d.Req.Options["num_predict"] != int64(8) {
				t.Errorf("options %v", d.Req.Options)
			}
		}},
		{name: "embed list", body: `{"input":["a","b"]}`, schemaAgrees: true, check: func(t *testing.T, d *wire.Decoded) {
			if d.Req.Kind != inference.Embed || len(d.Req.Input) != 2 {
				t.Errorf("got %+v", d.Req)
			}
		}},
		{name: "embed string", body: `{"input":"a"}`, schemaAgrees: true},
		{name: "content type with charset", body: `{"prompt":"x"}`, ctype: "application/json; charset=utf-8", schemaAgrees: true},
		{name: "future deadline", body: `{"prompt":"x","deadline":"2030-01-01T00:00:00Z"}`, schemaAgrees: true},
		{name: "not json", body: `hello`, reason: wire.ReasonInvalidJSON, schemaAgrees: true},
		{name: "empty", body: ``, reason: wire.ReasonInvalidJSON, schemaAgrees: true},
		{name: "two values", body: `{"prompt":"a"}{"prompt":"b"}`, reason: wire.ReasonInvalidJSON},
		{name: "invalid utf8", body: "{\"prompt\":\"\xff\xfe\"}", reason: wire.ReasonInvalidUTF8},
		{name: "wrong type", body: `{"prompt":42}`, reason: wire.ReasonInvalidRequest, schemaAgrees: true},
		{name: "option wrong type", body: `{"prompt":"x","options":{"num_predict":"many"}}`, reason: wire.ReasonInvalidOption, schemaAgrees: true},
		{name: "option negative", body: `{"prompt":"x","options":{"num_predict":-5}}`, reason: wire.ReasonInvalidOption, schemaAgrees: true},
		{name: "option fraction", body: `{"prompt":"x","options":{"top_k":1.5}}`, reason: wire.ReasonInvalidOption, schemaAgrees: true},
		{name: "num_predict above the limit is capped", body: `{"prompt":"x","options":{"num_predict":100000000}}`, schemaAgrees: true, check: func(t *testing.T, d *wire.Decoded) {
			if d.Req.Options["num_predict"] != int64(256) {
				t.Errorf("num_predict %v, want capped at 256", d.Req.Options["num_predict"])
			}
			if want := []string{"num_predict 100000000 capped at 256 (SOUS_MAX_NUM_PREDICT)"}; strings.Join(d.Req.Notes, "|") != strings.Join(want, "|") {
				t.Errorf("notes %q, want %q", d.Req.Notes, want)
			}
		}},
		{name: "num_predict beyond int32", body: `{"prompt":"x","options":{"num_predict":1e12}}`, reason: wire.ReasonInvalidOption},
		{name: "option unknown", body: `{"prompt":"x","options":{"tempurature":1}}`, reason: wire.ReasonInvalidOption, schemaAgrees: true},
		{name: "unknown field", body: `{"prompt":"x","colour":"red"}`, reason: wire.ReasonInvalidRequest, schemaAgrees: true},
		{name: "no prompt", body: `{"model":"tiny"}`, reason: wire.ReasonMissingPrompt, schemaAgrees: true},
		{name: "blank prompt", body: `{"prompt":"  "}`, reason: wire.ReasonMissingPrompt},
		{name: "prompt and messages", body: `{"prompt":"x","messages":[{"role":"user","content":"y"}]}`, reason: wire.ReasonInvalidRequest, schemaAgrees: true},
		{name: "bad role", body: `{"messages":[{"role":"god","content":"y"}]}`, reason: wire.ReasonInvalidRequest, schemaAgrees: true},
		{name: "model not allowed", body: `{"prompt":"x","model":"secret-model"}`, reason: wire.ReasonModelNotAllowed},
		{name: "too large", body: `{"prompt":"` + strings.Repeat("a", 5000) + `"}`, reason: wire.ReasonBodyTooLarge},
		{name: "prompt too large", body: `{"prompt":"` + strings.Repeat("a", 2000) + `"}`, reason: wire.ReasonPromptTooLarge},
		{name: "expired deadline", body: `{"prompt":"x","deadline":"2020-01-01T00:00:00Z"}`, reason: wire.ReasonExpired},
		{name: "bad deadline", body: `{"prompt":"x","deadline":"tomorrow"}`, reason: wire.ReasonInvalidRequest, schemaAgrees: true},
		{name: "trailing bracket", body: `{"prompt":"x"}]`, reason: wire.ReasonInvalidJSON, schemaAgrees: true},
		{name: "trailing space ok", body: "{\"prompt\":\"x\"}\n ", schemaAgrees: true},
		{name: "stream embeddings", body: `{"input":"x","stream":true}`, reason: wire.ReasonInvalidRequest},
		{name: "xml", body: `{"prompt":"x"}`, ctype: "application/xml", reason: wire.ReasonContentType},
		{name: "deep nesting", body: `{"format":` + strings.Repeat("[", 20000) + strings.Repeat("]", 20000) + `,"prompt":"x"}`, reason: wire.ReasonBodyTooLarge},
		{name: "NUL in id", body: `{"id":"a\u0000b","prompt":"x"}`, reason: wire.ReasonInvalidRequest},
		{name: "tools", body: `{"messages":[{"role":"user","content":"weather?"}],"tools":[` + weatherTool + `],"tool_choice":"auto"}`, schemaAgrees: true, check: func(t *testing.T, d *wire.Decoded) {
			if len(d.Req.Tools) != 1 || d.Req.Tools[0].Function.Name != "get_weather" || string(d.Req.ToolChoice) != `"auto"` {
				t.Errorf("tools %+v choice %s", d.Req.Tools, d.Req.ToolChoice)
			}
			if !strings.Contains(string(d.Req.Tools[0].Function.Parameters), `"city"`) {
				t.Errorf("parameters %s", d.Req.Tools[0].Function.Parameters)
			}
		}},
		{name: "tool type defaults to function", body: `{"messages":[{"role":"user","content":"x"}],"tools":[{"function":{"name":"f"}}]}`, schemaAgrees: true, check: func(t *testing.T, d *wire.Decoded) {
			if d.Req.Tools[0].Type != "function" {
				t.Errorf("type %q", d.Req.Tools[0].Type)
			}
		}},
		{name: "tool choice a function", body: `{"messages":[{"role":"user","content":"x"}],"tools":[` + weatherTool + `],"tool_choice":{"type":"function","function":{"name":"get_weather"}}}`, schemaAgrees: true},
		{name: "second turn", body: `{"messages":[{"role":"user","content":"weather?"},{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\": \"Paris\"}"}}]},{"role":"tool","tool_call_id":"call_1","content":"sunny"}],"tools":[` + weatherTool + `]}`, schemaAgrees: true, check: func(t *testing.T, d *wire.Decoded) {
			m := d.Req.Messages[1]
			if len(m.ToolCalls) != 1 || string(m.ToolCalls[0].Function.Arguments) != `{"city":"Paris"}` || m.Content != "" {
				t.Errorf("assistant message %+v (arguments %s): want the string arguments as a compact object", m, m.ToolCalls[0].Function.Arguments)
			}
			if d.Req.Messages[2].ToolCallID != "call_1" {
				t.Errorf("tool message %+v", d.Req.Messages[2])
			}
		}},
		{name: "tool call arguments object", body: `{"messages":[{"role":"assistant","tool_calls":[{"function":{"name":"f","arguments":{"a":1}}}]},{"role":"tool","content":"2"}]}`, schemaAgrees: true},
		{name: "tools on a prompt", body: `{"prompt":"x","tools":[` + weatherTool + `]}`, reason: wire.ReasonInvalidTools, schemaAgrees: true},
		{name: "tool not a function", body: `{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"code","function":{"name":"f"}}]}`, reason: wire.ReasonInvalidTools, schemaAgrees: true},
		{name: "tool without name", body: `{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"description":"d"}}]}`, reason: wire.ReasonInvalidTools, schemaAgrees: true},
		{name: "tool name with space", body: `{"messages":[{"role":"user","content":"x"}],"tools":[{"function":{"name":"get weather"}}]}`, reason: wire.ReasonInvalidTools, schemaAgrees: true},
		{name: "tool parameters not an object", body: `{"messages":[{"role":"user","content":"x"}],"tools":[{"function":{"name":"f","parameters":[1]}}]}`, reason: wire.ReasonInvalidTools, schemaAgrees: true},
		{name: "tool unknown field", body: `{"messages":[{"role":"user","content":"x"}],"tools":[{"function":{"name":"f","colour":1}}]}`, reason: wire.ReasonInvalidRequest, schemaAgrees: true},
		{name: "two tools same name", body: `{"messages":[{"role":"user","content":"x"}],"tools":[{"function":{"name":"f"}},{"function":{"name":"f"}}]}`, reason: wire.ReasonInvalidTools},
		{name: "tool choice without tools", body: `{"messages":[{"role":"user","content":"x"}],"tool_choice":"auto"}`, reason: wire.ReasonInvalidTools, schemaAgrees: true},
		{name: "tool choice unknown word", body: `{"messages":[{"role":"user","content":"x"}],"tools":[` + weatherTool + `],"tool_choice":"always"}`, reason: wire.ReasonInvalidTools, schemaAgrees: true},
		{name: "tool choice names another function", body: `{"messages":[{"role":"user","content":"x"}],"tools":[` + weatherTool + `],"tool_choice":{"type":"function","function":{"name":"nope"}}}`, reason: wire.ReasonInvalidTools},
		{name: "tool calls on a user message", body: `{"messages":[{"role":"user","content":"x","tool_calls":[{"function":{"name":"f","arguments":{}}}]}]}`, reason: wire.ReasonInvalidToolCall, schemaAgrees: true},
		{name: "tool call id on a user message", body: `{"messages":[{"role":"user","content":"x","tool_call_id":"c"}]}`, reason: wire.ReasonInvalidToolCall, schemaAgrees: true},
		{name: "tool call arguments a list", body: `{"messages":[{"role":"assistant","tool_calls":[{"function":{"name":"f","arguments":[1]}}]}]}`, reason: wire.ReasonInvalidToolCall, schemaAgrees: true},
		{name: "tool call arguments a bad string", body: `{"messages":[{"role":"assistant","tool_calls":[{"function":{"name":"f","arguments":"{oops"}}]}]}`, reason: wire.ReasonInvalidToolCall},
		{name: "tool call without arguments", body: `{"messages":[{"role":"assistant","tool_calls":[{"function":{"name":"f"}}]}]}`, reason: wire.ReasonInvalidToolCall, schemaAgrees: true},
		{name: "tools too many", body: `{"messages":[{"role":"user","content":"x"}],"tools":[` + strings.Repeat(`{"function":{"name":"f"}},`, 128) + `{"function":{"name":"g"}}]}`, reason: wire.ReasonInvalidTools, schemaAgrees: true},
		{name: "tools count toward the prompt limit", body: `{"messages":[{"role":"user","content":"x"}],"tools":[{"function":{"name":"f","description":"` + strings.Repeat("d", 1100) + `"}}]}`, reason: wire.ReasonPromptTooLarge},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			d, err := wire.DecodeRequest([]byte(tt.body), tt.ctype, "msg-1", limits(), now)
			if tt.reason == "" {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				if tt.check != nil {
					tt.check(t, d)
				}
			} else {
				var ie *wire.InputError
				if !errors.As(err, &ie) {
					t.Fatalf("want InputError %s, got %v", tt.reason, err)
				}
				if ie.Reason != tt.reason {
					t.Fatalf("reason = %s (%s), want %s", ie.Reason, ie.Message, tt.reason)
				}
				if strings.Contains(ie.Message, strings.Repeat("a", 100)) {
					t.Errorf("error message echoes the body: %q", ie.Message)
				}
			}
			if tt.schemaAgrees {
				serr := validates(t, reqSchema, []byte(tt.body))
				if (serr == nil) != (tt.reason == "") {
					t.Errorf("schema disagrees with decoder: schema error %v, decoder reason %q", serr, tt.reason)
				}
			}
		})
	}
}

// TestRejectedRequestKeepsItsID: the producer's own id comes back in the
// error result whenever it can be read, even from a body that is otherwise
// wrong, and never an id the decoder would refuse.
func TestRejectedRequestKeepsItsID(t *testing.T) {
	t.Parallel()
	long := strings.Repeat("x", 257)
	tests := []struct {
		name, body, id string // id "" = no Decoded expected
	}{
		{"wrong type after id", `{"id":"mine","prompt":42}`, "mine"},
		{"broken JSON after id", `{"id":"mine","prompt":"x",}`, "mine"},
		{"unknown field", `{"colour":"red","id":"mine"}`, "mine"},
		{"id after nested values", `{"options":{"id":"inner"},"messages":[{"id":"no"}],"id":"outer","prompt":1}`, "outer"},
		{"case-insensitive like encoding/json", `{"ID":"mine","prompt":false}`, "mine"},
		{"too large", `{"id":"big","prompt":"` + strings.Repeat("a", 5000) + `"}`, "big"},
		{"unknown option", `{"id":"mine","prompt":"x","options":{"tempurature":1}}`, "mine"},
		{"not an object", `["id","mine"]`, ""},
		{"id not a string", `{"id":7,"prompt":1}`, ""},
		{"id too long", `{"id":"` + long + `","prompt":1}`, ""},
		{"id with NUL", `{"id":"a\u0000b","prompt":"x"}`, ""},
		{"broken before id", `{"prompt":"x",,"id":"mine"}`, ""},
		{"not JSON", `hello`, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			d, err := wire.DecodeRequest([]byte(tt.body), "", "msg-1", limits(), now)
			if err == nil {
				t.Fatal("accepted")
			}
			switch {
			case tt.id == "" && d != nil && d.ID != "msg-1":
				t.Errorf("got id %q, want none (or the fallback)", d.ID)
			case tt.id != "" && (d == nil || d.ID != tt.id):
				t.Errorf("got %+v, want id %q", d, tt.id)
			}
		})
	}
}

func TestOptionErrorsReadAsNumbers(t *testing.T) {
	t.Parallel()
	_, err := wire.DecodeRequest([]byte(`{"prompt":"x","options":{"num_predict":0}}`), "", "m", limits(), now)
	if err == nil || !strings.Contains(err.Error(), `option "num_predict" must be between 1 and 2147483647, got 0`) {
		t.Fatalf("error %v", err)
	}
	_, err = wire.DecodeRequest([]byte(`"hello"`), "", "m", limits(), now)
	if err == nil || !strings.Contains(err.Error(), "the body must be a JSON object") || strings.Contains(err.Error(), "wire.Request") {
		t.Fatalf("error %v", err)
	}
	_, err = wire.DecodeRequest([]byte(`{"messages":"hi"}`), "", "m", limits(), now)
	if err == nil || !strings.Contains(err.Error(), `field "messages" must be a list of objects, not a JSON string`) {
		t.Fatalf("error %v", err)
	}
}

func TestResultsMatchSchema(t *testing.T) {
	t.Parallel()
	resSchema := schema(t, "result.schema.json")
	chunkSchema := schema(t, "chunk.schema.json")
	done := true
	ok := wire.OKResult("r1", inference.Request{Kind: inference.Generate, Model: "tiny"}, inference.Response{Text: "hi", DoneReason: "stop", Usage: inference.Usage{InputTokens: 3, OutputTokens: 1}})
	ok.Worker, ok.Batch, ok.Attempt = "w1", &wire.BatchInfo{ID: "b1", Size: 4}, 1
	ok.Notes = []string{wire.NumPredictCapped(10000, 4096)}
	chat := wire.OKResult("r2", inference.Request{Kind: inference.Chat, Model: "tiny"}, inference.Response{Message: &inference.Message{Role: "assistant", Content: "yo"}})
	chat.Worker, chat.Done = "w1", &done
	emb := wire.OKResult("r3", inference.Request{Kind: inference.Embed, Model: "tiny"}, inference.Response{Embeddings: [][]float32{{0.1, 0.2}}})
	emb.Worker = "w1"
	bad := wire.ErrorResult("r4", "tiny", "invalid_json", "body is not JSON")
	bad.Worker = "w1"
	calls := wire.OKResult("r5", inference.Request{Kind: inference.Chat, Model: "tiny"}, inference.Response{DoneReason: "stop", Message: &inference.Message{Role: "assistant", ToolCalls: []inference.ToolCall{
		{Function: inference.ToolCallFunction{Name: "get_weather", Arguments: json.RawMessage(`"{\"city\":\"Paris\"}"`)}},
	}}})
	calls.Worker = "w1"
	if c := calls.Message.ToolCalls[0]; calls.DoneReason != "tool_calls" || c.ID == "" || c.Type != "function" || string(c.Function.Arguments) != `{"city":"Paris"}` {
		t.Errorf("tool call result %+v, call %+v (arguments %s): want done_reason tool_calls, an id, type function, arguments an object", calls, c, c.Function.Arguments)
	}
	for _, v := range []wire.Result{ok, chat, emb, bad, calls} {
		b, _ := json.Marshal(v)
		if err := validates(t, resSchema, b); err != nil {
			t.Errorf("result %s does not match schema: %v\n%s", v.ID, err, b)
		}
	}
	broken := ok
	broken.Error = &wire.ErrorInfo{Code: "x", Message: "y"}
	b, _ := json.Marshal(broken)
	if validates(t, resSchema, b) == nil {
		t.Error("schema accepts an ok result with an error")
	}
	c, _ := json.Marshal(wire.Chunk{ID: "r1", Seq: 0, Delta: "he", Attempt: 1})
	if err := validates(t, chunkSchema, c); err != nil {
		t.Errorf("chunk does not match schema: %v", err)
	}
	c, _ = json.Marshal(wire.Chunk{ID: "r1", Seq: 1, Attempt: 1, ToolCalls: calls.Message.ToolCalls})
	if err := validates(t, chunkSchema, c); err != nil {
		t.Errorf("tool call chunk does not match schema: %v\n%s", err, c)
	}
}

// TestBatchKeyTools: requests that offer different tools, or choose
// differently among them, never share an engine call.
func TestBatchKeyTools(t *testing.T) {
	t.Parallel()
	key := func(body string) string {
		t.Helper()
		d, err := wire.DecodeRequest([]byte(body), "", "m", limits(), now)
		if err != nil {
			t.Fatalf("%s: %v", body, err)
		}
		return d.BatchKey()
	}
	const user = `"messages":[{"role":"user","content":"x"}]`
	plain := key(`{` + user + `}`)
	weather := key(`{` + user + `,"tools":[` + weatherTool + `]}`)
	other := key(`{` + user + `,"tools":[{"function":{"name":"other"}}]}`)
	auto := key(`{` + user + `,"tools":[` + weatherTool + `],"tool_choice":"auto"}`)
	required := key(`{` + user + `,"tools":[` + weatherTool + `],"tool_choice":"required"}`)
	keys := []string{plain, weather, other, auto, required}
	for i := range keys {
		for j := range i {
			if keys[i] == keys[j] {
				t.Errorf("keys %d and %d are equal: %q", i, j, keys[i])
			}
		}
	}
	if again := key(`{"messages":[{"role":"user","content":"other text"}],"tools":[` + weatherTool + `]}`); again != weather {
		t.Error("same tools, different messages: different keys; want one batch")
	}
}

func FuzzDecodeRequest(f *testing.F) {
	seeds, _ := filepath.Glob(filepath.Join("testdata", "corpus", "*.json"))
	for _, s := range seeds {
		b, err := os.ReadFile(s)
		if err == nil {
			f.Add(b, "application/json")
		}
	}
	f.Add([]byte(`{"prompt":"hi","options":{"num_predict":5,"stop":["a"]}}`), "")
	f.Add([]byte(`{"messages":[{"role":"user","content":"x"}],"format":{"type":"object"}}`), "application/json")
	f.Add([]byte(`{"input":["a"],"deadline":"2030-01-01T00:00:00Z"}`), "text/json")
	f.Add([]byte(`{"messages":[{"role":"user","content":"w"},{"role":"assistant","content":null,"tool_calls":[{"id":"c","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]},{"role":"tool","tool_call_id":"c","content":"sunny"}],"tools":[`+weatherTool+`],"tool_choice":{"type":"function","function":{"name":"get_weather"}}}`), "application/json")
	f.Fuzz(func(t *testing.T, body []byte, ctype string) {
		d, err := wire.DecodeRequest(body, ctype, "fallback", limits(), now)
		if err != nil {
			var ie *wire.InputError
			if !errors.As(err, &ie) || ie.Reason == "" {
				t.Fatalf("error is not a classified InputError: %v", err)
			}
			if d != nil && (d.ID == "" || len(d.ID) > 256 || strings.ContainsRune(d.ID, 0)) {
				t.Fatalf("rejected request echoes an id the decoder would refuse: %q", d.ID)
			}
			return
		}
		if d.ID == "" || d.Req.Model == "" || d.Req.Kind == 0 {
			t.Fatalf("accepted an incomplete request: %+v", d)
		}
		if n, ok := d.Req.Options["num_predict"].(int64); !ok || n < 1 || n > 256 {
			t.Fatalf("num_predict out of bounds: %v", d.Req.Options["num_predict"])
		}
		if (len(d.Req.Tools) > 0 || len(d.Req.ToolChoice) > 0) && d.Req.Kind != inference.Chat {
			t.Fatalf("accepted tools on a %s request", d.Req.Kind)
		}
		for _, m := range d.Req.Messages {
			for _, c := range m.ToolCalls {
				if m.Role != "assistant" || !json.Valid(c.Function.Arguments) || c.Function.Arguments[0] != '{' {
					t.Fatalf("accepted tool call %+v on a %s message", c, m.Role)
				}
			}
		}
		if d.BatchKey() == "" {
			t.Fatal("empty batch key")
		}
	})
}
