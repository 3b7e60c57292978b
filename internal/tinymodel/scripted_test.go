package tinymodel_test

import (
	"math"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/sous-run/sous/internal/tinymodel"
)

func TestDefaultScriptsMatchTheirAnswers(t *testing.T) {
	t.Parallel()
	want := map[string]string{
		"▁blue?":  tinymodel.SkyAnswer,
		"▁do?":    tinymodel.QueueAnswer,
		"▁five?":  tinymodel.CountAnswer,
		"▁Paris?": tinymodel.WeatherToolCall,
		"▁" + tinymodel.WeatherTool + "=" + tinymodel.WeatherToolResult: tinymodel.WeatherAnswer,
		"▁London?":                   tinymodel.ParallelToolCalls,
		tinymodel.ParallelToolResult: tinymodel.ParallelAnswer,
	}
	questions := map[string]string{
		"▁blue?":   tinymodel.SkyQuestion,
		"▁do?":     tinymodel.QueueQuestion,
		"▁five?":   tinymodel.CountQuestion,
		"▁Paris?":  tinymodel.WeatherQuestion,
		"▁London?": tinymodel.ParallelQuestion,
	}
	scripts := tinymodel.DefaultScripts()
	if len(scripts) != len(want) {
		t.Fatalf("%d scripts, want %d", len(scripts), len(want))
	}
	for _, s := range scripts {
		if got := s.Text(); got != want[s.Key] {
			t.Errorf("script %q answers %q, want %q", s.Key, got, want[s.Key])
		}
		if q, ok := questions[s.Key]; ok && !strings.HasSuffix(strings.ReplaceAll(" "+q, " ", "▁"), s.Key) {
			t.Errorf("question %q does not end with the key %q", q, s.Key)
		}
	}
}

// forward runs the scripted model's arithmetic on the written file: the
// residual is the token's embedding (attention and MLP are zero), then RMS
// norm and the output projection; greedy decoding from the key.
func forward(t *testing.T, path string, start string, limit int) string {
	t.Helper()
	g, f := decode(t, path)
	toks := g.KV().Strings("tokenizer.ggml.tokens")
	id := slices.Index(toks, start)
	if id < 0 {
		t.Fatalf("no token %q", start)
	}
	tensors := map[string][]float32{}
	for _, tt := range g.Tensors().Items() {
		vals := readTensor(t, f, int64(g.Tensors().Offset+tt.Offset), tt.Elements())
		if strings.HasPrefix(tt.Name, "blk.") && !strings.HasSuffix(tt.Name, "norm.weight") && slices.ContainsFunc(vals, func(v float32) bool { return v != 0 }) {
			t.Fatalf("%s is not zero", tt.Name)
		}
		tensors[tt.Name] = vals
	}
	const e = tinymodel.EmbeddingLength
	emb, out := tensors["token_embd.weight"], tensors["output.weight"]
	var text []string
	for range limit {
		x := emb[id*e : (id+1)*e]
		var ss float64
		for _, v := range x {
			ss += float64(v) * float64(v)
		}
		scale := 1 / math.Sqrt(ss/e+1e-5)
		best, bestLogit, second := -1, math.Inf(-1), math.Inf(-1)
		for tok := range toks {
			var l float64
			for d := range e {
				l += float64(x[d]) * scale * float64(out[tok*e+d])
			}
			switch {
			case l > bestLogit:
				second, best, bestLogit = bestLogit, tok, l
			case l > second:
				second = l
			}
		}
		if bestLogit-second < 20 {
			t.Fatalf("after %q the best logit leads by %.1f only", toks[id], bestLogit-second)
		}
		if best == tinymodel.EOSID {
			break
		}
		text = append(text, toks[best])
		id = best
	}
	return strings.ReplaceAll(strings.Join(text, ""), "▁", " ")
}

func TestScriptedForward(t *testing.T) {
	t.Parallel()
	sp := t.TempDir() + "/scripted.gguf"
	if err := tinymodel.WriteScriptedFile(sp, tinymodel.ScriptedOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, s := range tinymodel.DefaultScripts() {
		if got := forward(t, sp, s.Key, 50); got != s.Text() {
			t.Errorf("from %q: %q, want %q", s.Key, got, s.Text())
		}
	}
	// Any token no script is keyed on gets the fallback: a byte, a key's
	// prefix, the start token.
	for _, tok := range []string{"<0x3F>", "▁Pa", "<s>"} {
		if got := forward(t, sp, tok, 50); got != tinymodel.FallbackAnswer {
			t.Errorf("from %q: %q, want the fallback %q", tok, got, tinymodel.FallbackAnswer)
		}
	}
	st, err := os.Stat(sp)
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() > 1<<20 {
		t.Errorf("file is %d bytes, want under 1 MiB", st.Size())
	}
}

func TestScriptedRejects(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		scripts []tinymodel.Script
		want    string
	}{
		{"buildable reply", []tinymodel.Script{{Key: "▁hi?", Reply: []string{"ok"}}}, "can be built"},
		{"prefix plus char", []tinymodel.Script{{Key: "▁hi?", Reply: []string{"▁hi!"}}}, "can be built"},
		{"two successors", []tinymodel.Script{{Key: "▁a?", Reply: []string{"Yes▁sir", "▁bye."}}, {Key: "▁b?", Reply: []string{"Yes▁sir", "▁hello."}}}, "followed by both"},
		{"same key", []tinymodel.Script{{Key: "▁a?", Reply: []string{"Yes▁sir"}}, {Key: "▁a?", Reply: []string{"No▁sir"}}}, "two scripts"},
		{"reply is a key", []tinymodel.Script{{Key: "▁a?", Reply: []string{"▁b?"}}, {Key: "▁b?", Reply: []string{"No▁sir"}}}, "a key"},
		{"empty reply", []tinymodel.Script{{Key: "▁a?"}}, "needs a key"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			err := tinymodel.WriteScriptedFile(t.TempDir()+"/m.gguf", tinymodel.ScriptedOptions{Scripts: tc.scripts})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v, want one containing %q", err, tc.want)
			}
		})
	}
}

func TestScriptedTokensHoldKeyPrefixes(t *testing.T) {
	t.Parallel()
	toks, err := tinymodel.ScriptedTokens(tinymodel.ScriptedOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"▁b", "▁bl", "▁blu", "▁blue", "▁blue?", "▁get_weather=sunn"} {
		if !slices.Contains(toks, p) {
			t.Errorf("vocabulary lacks %q", p)
		}
	}
	seen := map[string]bool{}
	for _, tok := range toks {
		if seen[tok] {
			t.Errorf("token %q twice (llama.cpp refuses duplicate tokens)", tok)
		}
		seen[tok] = true
	}
}
