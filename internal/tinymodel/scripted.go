package tinymodel

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"unicode/utf8"

	"github.com/ollama/ollama/fs/ggml"
)

// The default scripts' questions and answers, as a client sends and
// receives them. They hold for a prompt rendered by a template that ends
// with the last message's content (see ScriptedTemplate).
const (
	// SkyQuestion is answered with SkyAnswer.
	SkyQuestion = "Why is the sky blue?"
	SkyAnswer   = "The sky is blue because air scatters blue light more than red light."
	// QueueQuestion is answered with QueueAnswer.
	QueueQuestion = "What does sous do?"
	QueueAnswer   = "It runs prompts from a queue on a local engine."
	// CountQuestion is answered with CountAnswer.
	CountQuestion = "Can you count to five?"
	CountAnswer   = "One, two, three, four, five."
	// WeatherQuestion is answered with the call WeatherToolCall of the tool
	// WeatherTool: as that JSON text, or, when the request offers tools
	// through Ollama, parsed into message.tool_calls.
	WeatherQuestion = "What is the weather in Paris?"
	WeatherTool     = "get_weather"
	WeatherToolCall = `{"name":"get_weather","arguments":{"city":"Paris"}}`
	// WeatherToolResult is what the tool answers; a second turn holding the
	// assistant's call of WeatherTool and a tool message with this content
	// is answered with WeatherAnswer.
	WeatherToolResult = "sunny"
	WeatherAnswer     = "It is sunny in Paris."
	// ParallelQuestion is answered with two calls of WeatherTool in one
	// answer, ParallelToolCalls: Paris, then London. A second turn holding
	// both calls and a tool message for each, the last one's content
	// ParallelToolResult (London's; Paris's is WeatherToolResult), is
	// answered with ParallelAnswer. Ollama joins the two tool messages
	// into one, "sunny\n\nrainy": the script is keyed on the last word.
	ParallelQuestion   = "What is the weather in Paris and London?"
	ParallelToolCalls  = `{"name":"get_weather","arguments":{"city":"Paris"}}{"name":"get_weather","arguments":{"city":"London"}}`
	ParallelToolResult = "rainy"
	ParallelAnswer     = "It is sunny in Paris and rainy in London."
	// FallbackAnswer answers every prompt that no script is keyed on.
	FallbackAnswer = "I only know my scripts."
)

// ScriptedTemplate is the Ollama chat template the scripted model is keyed
// for. It renders one line per message, "role: content", and ends with the
// last message's content, so the prompt's last piece selects the script. A
// tool message is rendered as "tool: NAME=CONTENT", NAME being the function
// of the last tool call before it: a second turn is keyed on the call and
// the tool's answer together, so it proves both reached the engine.
// Assistant tool calls are rendered as the JSON the model answers with;
// because the template ranges over .ToolCalls and mentions .Tools, Ollama
// (0.6.5) reports the "tools" capability and parses that JSON in an
// answer into message.tool_calls.
const ScriptedTemplate = `{{- $tool := "" }}{{ if .Tools }}tools:{{ range .Tools }} {{ .Function.Name }}{{ end }}
{{ end }}{{ range $i, $m := .Messages }}{{ if $i }}
{{ end }}{{ .Role }}:{{ if eq .Role "tool" }} {{ if $tool }}{{ $tool }}={{ end }}{{ .Content }}{{ else }}{{ if .Content }} {{ .Content }}{{ end }}{{ if .ToolCalls }}{{ $tool = (index .ToolCalls 0).Function.Name }}{{ end }}{{ range .ToolCalls }} {"name":"{{ .Function.Name }}","arguments":{{ .Function.Arguments }}}{{ end }}{{ end }}{{ end }}`

// Script is one scripted answer: when the rendered prompt ends with the
// piece Key, the model answers with the pieces of Reply, one token each,
// then ends (</s>, done_reason "stop").
//
// Pieces are SentencePiece text: "▁" is a space. The key is a word as the
// tokenizer sees it at the end of a prompt ("▁blue?" for a prompt ending
// " blue?"); the vocabulary gets every prefix of it, so that the tokenizer,
// which merges adjacent pieces only into pieces it knows, can build it.
// Reply pieces must not be buildable that way (so that no prompt is
// tokenized into them and none of them takes part in a merge), and a piece
// used in two replies must be followed by the same piece in both.
type Script struct {
	Key   string
	Reply []string
}

// Text is the answer as a client receives it.
func (s Script) Text() string { return pieceText(s.Reply) }

func pieceText(pieces []string) string {
	return strings.ReplaceAll(strings.Join(pieces, ""), "▁", " ")
}

// DefaultScripts returns the scripts behind the questions and answers
// declared above.
func DefaultScripts() []Script {
	return []Script{
		{Key: "▁blue?", Reply: []string{"The", "▁sky▁is", "▁blue▁because", "▁air▁scatters", "▁blue▁light", "▁more▁than", "▁red▁light."}},
		{Key: "▁do?", Reply: []string{"It▁runs", "▁prompts▁from", "▁a▁queue", "▁on▁a▁local", "▁engine."}},
		{Key: "▁five?", Reply: []string{"One,", "▁two,", "▁three,", "▁four,▁five."}},
		{Key: "▁Paris?", Reply: []string{`{"name":`, `"get_weather",`, `"arguments":`, `{"city":`, `"Paris"}}`}},
		{Key: "▁get_weather=sunny", Reply: []string{"It▁is", "▁sunny", "▁in▁Paris."}},
		// One piece per call: Ollama, streaming, hands on each call as soon
		// as the text so far parses as one.
		{Key: "▁London?", Reply: []string{`{"name":"get_weather","arguments":{"city":"Paris"}}`, `{"name":"get_weather","arguments":{"city":"London"}}`}},
		// Ollama (0.6.5) joins consecutive messages of one role, the tool
		// answers too ("sunny\n\nrainy"): the last word has no space before it.
		{Key: "rainy", Reply: []string{"It▁is▁sunny▁in▁Paris", "▁and▁rainy", "▁in▁London."}},
	}
}

// defaultFallback is FallbackAnswer in pieces.
var defaultFallback = []string{"I▁only", "▁know▁my", "▁scripts."}

// ScriptedOptions select a scripted model. The zero value is valid.
type ScriptedOptions struct {
	// Scripts default to DefaultScripts().
	Scripts []Script
	// Fallback is the reply, in pieces, to a prompt no script is keyed on.
	// Default: FallbackAnswer.
	Fallback []string
	// ContextLength is llama.context_length. Default DefaultContextLength.
	ContextLength uint32
}

// scriptWeight is an output weight that selects a token: after the final
// RMS norm the one-hot state is about sqrt(EmbeddingLength) = 8, so the
// chosen logit is 8 × 4 = 32 and every other logit 0. The rest of the
// vocabulary then shares a probability of about 300·e⁻³² ≈ 4e-12: the same
// answer at any temperature, seed or sampler setting Ollama offers.
const scriptWeight = 4

// scripted is a scripted model compiled: its vocabulary and the state
// (embedding dimension) of every token, each state's next token.
type scripted struct {
	tokens []string
	state  []int // per token id
	next   []int // per state: the token it emits
}

// compile checks the scripts and lays out the model.
func compile(opts ScriptedOptions) (*scripted, error) {
	scripts := opts.Scripts
	if scripts == nil {
		scripts = DefaultScripts()
	}
	fallback := opts.Fallback
	if fallback == nil {
		fallback = defaultFallback
	}
	if len(fallback) == 0 {
		return nil, fmt.Errorf("tiny model: the fallback reply is empty")
	}

	toks := []string{"<unk>", "<s>", "</s>"}
	for b := range 256 {
		toks = append(toks, fmt.Sprintf("<0x%02X>", b))
	}
	id := map[string]int{}
	for i, t := range toks {
		id[t] = i
	}
	add := func(p string) int {
		if i, ok := id[p]; ok {
			return i
		}
		id[p] = len(toks)
		toks = append(toks, p)
		return id[p]
	}

	keys := map[string]bool{}
	for _, s := range scripts {
		if s.Key == "" || len(s.Reply) == 0 {
			return nil, fmt.Errorf("tiny model: script %q: needs a key and a reply", s.Key)
		}
		if keys[s.Key] {
			return nil, fmt.Errorf("tiny model: two scripts are keyed on %q", s.Key)
		}
		keys[s.Key] = true
		// Every prefix of the key, so the tokenizer can merge up to it.
		r := []rune(s.Key)
		for n := 2; n <= len(r); n++ {
			add(string(r[:n]))
		}
		add(s.Key)
	}

	// succ maps a token to the token that follows it; EOSID ends a reply.
	succ := map[int]int{}
	link := func(from, to int) error {
		if prev, ok := succ[from]; ok && prev != to {
			return fmt.Errorf("tiny model: piece %q is followed by both %q and %q", toks[from], toks[prev], toks[to])
		}
		succ[from] = to
		return nil
	}
	chain := func(start int, reply []string) error {
		from := start
		for _, p := range reply {
			if p == "" || keys[p] || isSpecial(p) {
				return fmt.Errorf("tiny model: reply piece %q is empty, a key or a special token", p)
			}
			to := add(p)
			if err := link(from, to); err != nil {
				return err
			}
			from = to
		}
		return link(from, EOSID)
	}
	for _, s := range scripts {
		if err := chain(id[s.Key], s.Reply); err != nil {
			return nil, err
		}
	}
	// The fallback starts from the default state, which has no token of
	// its own: chain it from a placeholder and take the link back out.
	const defaultFrom = -1
	if err := chain(defaultFrom, fallback); err != nil {
		return nil, err
	}

	vocab := map[string]bool{}
	for _, t := range toks[3+256:] {
		vocab[t] = true
	}
	for _, s := range scripts {
		for _, p := range s.Reply {
			if buildable(p, vocab, map[string]bool{}) {
				return nil, fmt.Errorf("tiny model: reply piece %q can be built from other pieces (%q); the tokenizer could produce it", p, s.Key)
			}
		}
	}
	for _, p := range fallback {
		if buildable(p, vocab, map[string]bool{}) {
			return nil, fmt.Errorf("tiny model: fallback piece %q can be built from other pieces", p)
		}
	}

	// States: 0 is the default (every token without a successor of its
	// own); tokens with the same successor share a state.
	m := &scripted{tokens: toks, state: make([]int, len(toks)), next: []int{succ[defaultFrom]}}
	byNext := map[int]int{}
	for tok := range toks {
		to, ok := succ[tok]
		if !ok {
			continue
		}
		st, ok := byNext[to]
		if !ok {
			st = len(m.next)
			byNext[to] = st
			m.next = append(m.next, to)
		}
		m.state[tok] = st
	}
	if len(m.next) > EmbeddingLength {
		return nil, fmt.Errorf("tiny model: the scripts need %d states, the embedding holds %d", len(m.next), EmbeddingLength)
	}
	return m, nil
}

func isSpecial(p string) bool {
	return p == "<unk>" || p == "<s>" || p == "</s>" || strings.HasPrefix(p, "<0x")
}

// buildable reports whether SentencePiece's merging could produce p: p
// splits into two parts each of which is one character or a buildable
// piece of the vocabulary. Parts are shorter than p, so it terminates;
// memo keeps it linear in practice.
func buildable(p string, vocab, memo map[string]bool) bool {
	if utf8.RuneCountInString(p) <= 1 {
		return true
	}
	if v, ok := memo[p]; ok {
		return v
	}
	ok := false
	for i := range p {
		if i == 0 {
			continue
		}
		if part(p[:i], vocab, memo) && part(p[i:], vocab, memo) {
			ok = true
			break
		}
	}
	memo[p] = ok
	return ok
}

func part(s string, vocab, memo map[string]bool) bool {
	if utf8.RuneCountInString(s) == 1 {
		return true
	}
	return vocab[s] && buildable(s, vocab, memo)
}

// ScriptedTokens returns the scripted model's vocabulary in id order:
// <unk>, <s>, </s>, the byte tokens, then the keys' prefixes, the keys and
// the reply pieces.
func ScriptedTokens(opts ScriptedOptions) ([]string, error) {
	m, err := compile(opts)
	if err != nil {
		return nil, err
	}
	return m.tokens, nil
}

// WriteScriptedFile writes a scripted model to path as GGUF, as WriteFile
// does the random one: the same llama shape, but attention and
// feed-forward weights are zero, so the residual stream holds only the
// current token's embedding; embeddings are one-hot over states and the
// output projection maps each state to its next token. The model is a
// lookup table: the answer to a prompt depends only on the prompt's last
// token, the same at any temperature and seed, and one token per streamed
// chunk. A script is cut by num_predict (done_reason "length").
func WriteScriptedFile(path string, opts ScriptedOptions) error {
	m, err := compile(opts)
	if err != nil {
		return err
	}
	kv := vocabKV(KV(Options{ContextLength: opts.ContextLength}), m.tokens)
	kv["general.name"] = "tiny-scripted"
	shapes := tensorShapes(len(m.tokens))
	ts := make([]*ggml.Tensor, 0, len(shapes))
	for name, shape := range shapes {
		ts = append(ts, &ggml.Tensor{
			Name:     name,
			Kind:     uint32(ggml.TensorTypeF32),
			Shape:    shape,
			WriterTo: &scriptedData{m: m, name: name, shape: shape},
		})
	}
	return writeAtomically(path, kv, ts)
}

// vocabKV replaces the tokenizer metadata of kv with toks.
func vocabKV(kv ggml.KV, toks []string) ggml.KV {
	scores := make([]float32, len(toks))
	types := make([]int32, len(toks))
	for i := range toks {
		switch {
		case i == UnknownID:
			types[i] = tokenUnknown
		case i == BOSID || i == EOSID:
			types[i] = tokenControl
		case i < 3+256:
			types[i] = tokenByte
		default:
			types[i] = tokenNormal
			scores[i] = -float32(i - (3 + 256))
		}
	}
	kv["llama.vocab_size"] = uint32(len(toks))
	kv["tokenizer.ggml.tokens"] = toks
	kv["tokenizer.ggml.scores"] = scores
	kv["tokenizer.ggml.token_type"] = types
	return kv
}

// scriptedData is one tensor of a scripted model.
type scriptedData struct {
	m     *scripted
	name  string
	shape []uint64
}

func (t *scriptedData) values() []float32 {
	n := uint64(1)
	for _, d := range t.shape {
		n *= d
	}
	out := make([]float32, n)
	rows := t.shape[0]
	switch {
	case len(t.shape) == 1: // a norm
		for i := range out {
			out[i] = 1
		}
	case t.name == "token_embd.weight":
		for tok, st := range t.m.state {
			out[uint64(tok)*rows+uint64(st)] = 1
		}
	case t.name == "output.weight":
		for st, tok := range t.m.next {
			out[uint64(tok)*rows+uint64(st)] = scriptWeight
		}
	}
	// Attention and feed-forward weights stay zero.
	return out
}

func (t *scriptedData) WriteTo(w io.Writer) (int64, error) { return writeFloats(w, t.name, t.values()) }

// writeAtomically writes a GGUF beside path and renames it into place.
func writeAtomically(path string, kv ggml.KV, ts []*ggml.Tensor) (err error) {
	f, err := os.CreateTemp(filepath.Dir(path), ".tinymodel-*.gguf")
	if err != nil {
		return fmt.Errorf("tiny model: %w", err)
	}
	defer func() {
		if err != nil {
			_ = f.Close()
			_ = os.Remove(f.Name())
		}
	}()
	if err := ggml.WriteGGUF(f, kv, ts); err != nil {
		return fmt.Errorf("tiny model: write gguf: %w", err)
	}
	if err := f.Chmod(0o644); err != nil {
		return fmt.Errorf("tiny model: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("tiny model: %w", err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return fmt.Errorf("tiny model: %w", err)
	}
	return nil
}
