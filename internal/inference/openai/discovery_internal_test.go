package openai

import (
	"strings"
	"testing"
)

func TestParseSample(t *testing.T) {
	t.Parallel()
	tests := []struct {
		line  string
		name  string
		value float64
		ok    bool
	}{
		{`vllm:num_requests_running{engine="0",model_name="Qwen/Qwen3-0.6B"} 3.0`, "vllm:num_requests_running", 3, true},
		{`llamacpp:requests_deferred 9`, "llamacpp:requests_deferred", 9, true},
		{`tgi_queue_size 2 1712345678000`, "tgi_queue_size", 2, true},
		{`m{a="x}y",b="q\"}"} 1e1`, "m", 10, true},
		{"  m\t4  ", "m", 4, true},
		{`# TYPE m gauge`, "", 0, false},
		{``, "", 0, false},
		{`m{a="unclosed} 1`, "", 0, false},
		{`m`, "", 0, false},
		{`m{} `, "", 0, false},
		{`m NaN`, "", 0, false},
		{`m +Inf`, "", 0, false},
		{`m -1`, "", 0, false},
		{`m many`, "", 0, false},
		{`{a="b"} 1`, "", 0, false},
	}
	for _, tt := range tests {
		name, value, ok := parseSample(tt.line)
		if name != tt.name || value != tt.value || ok != tt.ok {
			t.Errorf("parseSample(%q) = %q, %v, %v; want %q, %v, %v", tt.line, name, value, ok, tt.name, tt.value, tt.ok)
		}
	}
}

// FuzzParseGauges: /metrics is outside input; whatever it holds, the parser
// neither panics nor yields a negative or non-finite count.
func FuzzParseGauges(f *testing.F) {
	f.Add([]byte("vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 3.0\nvllm:num_requests_waiting{engine=\"0\"} 1\n"))
	f.Add([]byte("# HELP llamacpp:requests_processing x\nllamacpp:requests_processing 4\n"))
	f.Add([]byte("tgi_queue_size{a=\"}\\\"\"} 1e308\ntgi_queue_size 1e308\n"))
	f.Add([]byte("{\n}\n\"\\"))
	f.Fuzz(func(t *testing.T, body []byte) {
		for name, v := range parseGauges(body) {
			if !queueGauges[name] || v < 0 || v != v {
				t.Fatalf("%q = %v", name, v)
			}
		}
		for line := range strings.SplitSeq(string(body), "\n") {
			if name, v, ok := parseSample(line); ok && (name == "" || v < 0) {
				t.Fatalf("parseSample(%q) = %q, %v", line, name, v)
			}
		}
	})
}
