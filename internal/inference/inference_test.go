package inference_test

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/sous-run/sous/internal/inference"
)

func TestToolArguments(t *testing.T) {
	t.Parallel()
	tests := []struct{ in, want string }{
		{`{"city":"Paris"}`, `{"city":"Paris"}`},
		{`"{\"city\":\"Paris\"}"`, `{"city":"Paris"}`},
		{``, `{}`},
		{`null`, `{}`},
		{`""`, `{}`},
		{`"not json"`, `"not json"`},
		{`[1,2]`, `"[1,2]"`},
		{`{broken`, `"{broken"`},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			t.Parallel()
			got := inference.ToolArguments(json.RawMessage(tc.in))
			if string(got) != tc.want || !json.Valid(got) {
				t.Errorf("ToolArguments(%s) = %s, want %s", tc.in, got, tc.want)
			}
		})
	}
}

func TestNewToolCallID(t *testing.T) {
	t.Parallel()
	a, b := inference.NewToolCallID(), inference.NewToolCallID()
	if a == b || !strings.HasPrefix(a, "call_") || len(a) != 29 {
		t.Errorf("ids %q, %q", a, b)
	}
}

func TestErrorReadsAsASentence(t *testing.T) {
	t.Parallel()
	tests := []struct {
		err  *inference.Error
		want string
	}{
		{&inference.Error{Kind: inference.Retryable, Code: "engine_unavailable", Err: errors.New("connection refused")},
			"the engine is unavailable (engine_unavailable): connection refused"},
		{&inference.Error{Kind: inference.Permanent, Code: "model_not_found", Status: 404, Err: errors.New(`model "x" not found`)},
			`the engine does not have the model (model_not_found, HTTP 404): model "x" not found`},
		{&inference.Error{Kind: inference.Retryable, Code: "engine_timeout"},
			"the engine did not answer within SOUS_ENGINE_TIMEOUT (engine_timeout)"},
		{&inference.Error{Kind: inference.Retryable, Code: "something_new", Err: errors.New("x")},
			"the engine failed (something_new): x"},
	}
	for _, tt := range tests {
		if got := tt.err.Error(); got != tt.want {
			t.Errorf("got  %q\nwant %q", got, tt.want)
		}
	}
}
