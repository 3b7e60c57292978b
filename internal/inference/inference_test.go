package inference_test

import (
	"encoding/json"
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
