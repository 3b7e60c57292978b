package gateway

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/wire"
)

// FuzzTranslate: any body an HTTP client sends (chat with tools, completions,
// embeddings, responses) is either refused with a 400 that says why, or
// becomes a sous request that the worker's decoder accepts or refuses with
// an InputError; nothing panics.
func FuzzTranslate(f *testing.F) {
	for _, seed := range []string{
		`{"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":8,"stop":["a"],"stream":true,"stream_options":{"include_usage":true}}`,
		`{"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"response_format":{"type":"json_schema","json_schema":{"schema":{"type":"object"}}}}`,
		`{"prompt":["once"],"temperature":0.5,"seed":1}`,
		`{"input":"x","encoding_format":"base64"}`,
		`{"input":[1,2]}`, `{"n":2}`, `[]`, `null`, ``, `{"messages":[{"role":"developer"}]}`,
		`{"messages":[{"role":"user","content":"w"},{"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]},{"role":"tool","tool_call_id":"c","content":"x"}],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],"tool_choice":{"type":"function","function":{"name":"f"}}}`,
		`{"instructions":"i","input":[{"role":"user","content":[{"type":"input_text","text":"w"}]},{"type":"function_call","call_id":"c","name":"f","arguments":"{}"},{"type":"function_call_output","call_id":"c","output":"x"}],"tools":[{"type":"function","name":"f"}],"tool_choice":"required","text":{"format":{"type":"json_object"}}}`,
	} {
		for ep := epChat; ep <= epResponses; ep++ {
			f.Add(uint8(ep), []byte(seed))
		}
	}
	lim := wire.Limits{MaxBodyBytes: 1 << 20, MaxPromptBytes: 1 << 16, MaxNumPredict: 64, DefaultModel: "tiny"}
	f.Fuzz(func(t *testing.T, ep uint8, body []byte) {
		var tr *translated
		var aerr *apiError
		switch endpoint(ep%4 + 1) {
		case epChat:
			tr, aerr = translateChat(body)
		case epCompletion:
			tr, aerr = translateCompletion(body)
		case epResponses:
			tr, aerr = translateResponses(body)
		default:
			tr, aerr = translateEmbedding(body)
		}
		if aerr != nil {
			if aerr.Status != 400 || aerr.Message == "" {
				t.Fatalf("refusal %+v", aerr)
			}
			return
		}
		msg, err := json.Marshal(tr.req)
		if err != nil {
			t.Fatalf("marshal %+v: %v", tr.req, err)
		}
		if _, err := wire.DecodeRequest(msg, "application/json", "id", lim, time.Now()); err != nil {
			var ie *wire.InputError
			if !errors.As(err, &ie) {
				t.Fatalf("decoder error %v is not an InputError", err)
			}
		}
	})
}

// FuzzParseKeys: any keys file parses or is refused, never panics, and an
// error never echoes a field after the hash (it may be a key pasted by
// mistake).
func FuzzParseKeys(f *testing.F) {
	hash := strings.Repeat("ab", 32)
	for _, s := range []string{"", "a " + hash, "a " + hash + " lanes=bulk,interactive rate=2 models=m", "a " + hash + " lanes=", "a " + hash + " lanes=x,x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, extra string) {
		if strings.ContainsAny(extra, "\r\n") {
			return // one line: the next line's name is not secret, and errors name it
		}
		line := "alice " + hash + " " + extra
		keys, err := ParseKeys([]byte(line), 0)
		if err != nil {
			for _, field := range strings.Fields(extra) {
				if len(field) >= 16 && strings.Contains(err.Error(), field) {
					t.Fatalf("the error %q echoes %q", err, field)
				}
			}
			return
		}
		for _, k := range keys {
			for _, l := range k.Lanes {
				if !validLaneName(l) {
					t.Fatalf("lane %q accepted", l)
				}
			}
		}
	})
}
