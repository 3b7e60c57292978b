package tinymodel

import (
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"io"
	"math"
	"math/rand/v2"

	"github.com/ollama/ollama/fs/ggml"
)

// Shape of the model. Small enough that the file is about half a megabyte
// and one CPU core generates several hundred tokens a second.
const (
	Architecture      = "llama"
	EmbeddingLength   = 64
	BlockCount        = 2
	FeedForwardLength = 128
	HeadCount         = 4
	HeadCountKV       = 4
	// DefaultContextLength is llama.context_length when Options leaves it 0.
	DefaultContextLength = 2048
)

// Token ids of the special tokens.
const (
	UnknownID = 0
	BOSID     = 1
	EOSID     = 2
)

// Token types, as llama.cpp numbers them.
const (
	tokenNormal  int32 = 1
	tokenUnknown int32 = 2
	tokenControl int32 = 3
	tokenByte    int32 = 6
)

// pieces are the normal (non-byte) tokens. Generation is steered towards
// them (see steer), so the model's gibberish is made of words and valid
// UTF-8 rather than random bytes. "▁" is SentencePiece's space.
var pieces = [...]string{
	"▁", ".", ",", "▁the", "▁a", "▁and", "▁of", "▁to", "▁in", "▁is",
	"▁it", "▁on", "▁for", "▁with", "▁hello", "▁world", "▁sous", "▁queue",
	"▁worker", "▁batch", "▁token", "▁model", "▁engine", "▁prompt",
	"▁reply", "▁message", "▁result", "▁small", "▁fast", "▁random", "▁gpu",
}

// VocabSize is the number of tokens: three special tokens, 256 byte tokens
// and the normal pieces.
const VocabSize = 3 + 256 + len(pieces)

// Options select the model. The zero value is valid.
type Options struct {
	// Seed selects the random weights. The same Options write the same bytes.
	// Default 0, a seed like any other.
	Seed uint64
	// ContextLength is the trained context, in tokens (llama.context_length).
	// Default DefaultContextLength.
	ContextLength uint32
	// Endless makes </s> unreachable: every generation runs until num_predict
	// or the context is full. For requests that must still be running when a
	// test interrupts them. By default </s> is about as likely as each of the
	// 31 words, so a generation ends by itself after about 30 tokens
	// (geometrically distributed, sometimes at once; deterministic for a
	// fixed prompt, seed and options).
	Endless bool
}

// Tokens returns the vocabulary in id order: <unk>, <s>, </s>, the byte
// tokens <0x00>..<0xFF>, then the normal pieces.
func Tokens() []string {
	toks := make([]string, 0, VocabSize)
	toks = append(toks, "<unk>", "<s>", "</s>")
	for b := range 256 {
		toks = append(toks, fmt.Sprintf("<0x%02X>", b))
	}
	return append(toks, pieces[:]...)
}

// KV returns the GGUF metadata that WriteFile writes.
func KV(opts Options) ggml.KV {
	ctxLen := opts.ContextLength
	if ctxLen == 0 {
		ctxLen = DefaultContextLength
	}
	toks := Tokens()
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
			// SentencePiece prefers merges with higher scores.
			scores[i] = -float32(i - (3 + 256))
		}
	}
	return ggml.KV{
		"general.architecture":                   Architecture,
		"general.name":                           "tiny",
		"general.file_type":                      uint32(0), // all F32
		"general.alignment":                      uint32(32),
		"llama.context_length":                   ctxLen,
		"llama.embedding_length":                 uint32(EmbeddingLength),
		"llama.block_count":                      uint32(BlockCount),
		"llama.feed_forward_length":              uint32(FeedForwardLength),
		"llama.attention.head_count":             uint32(HeadCount),
		"llama.attention.head_count_kv":          uint32(HeadCountKV),
		"llama.attention.layer_norm_rms_epsilon": float32(1e-5),
		"llama.rope.dimension_count":             uint32(EmbeddingLength / HeadCount),
		"llama.rope.freq_base":                   float32(10000),
		"llama.vocab_size":                       uint32(len(toks)),
		"tokenizer.ggml.model":                   "llama",
		"tokenizer.ggml.tokens":                  toks,
		"tokenizer.ggml.scores":                  scores,
		"tokenizer.ggml.token_type":              types,
		"tokenizer.ggml.unknown_token_id":        uint32(UnknownID),
		"tokenizer.ggml.bos_token_id":            uint32(BOSID),
		"tokenizer.ggml.eos_token_id":            uint32(EOSID),
		"tokenizer.ggml.add_bos_token":           true,
		"tokenizer.ggml.add_eos_token":           false,
	}
}

// TensorShapes returns every tensor's name and shape, in ggml order (first
// dimension first: token_embd.weight is [EmbeddingLength, VocabSize]).
func TensorShapes() map[string][]uint64 { return tensorShapes(VocabSize) }

func tensorShapes(vocab int) map[string][]uint64 {
	const e, f = EmbeddingLength, FeedForwardLength
	v := uint64(vocab)
	kvDim := uint64(e / HeadCount * HeadCountKV)
	shapes := map[string][]uint64{
		"token_embd.weight":  {e, v},
		"output_norm.weight": {e},
		"output.weight":      {e, v},
	}
	for b := range BlockCount {
		p := fmt.Sprintf("blk.%d.", b)
		shapes[p+"attn_norm.weight"] = []uint64{e}
		shapes[p+"attn_q.weight"] = []uint64{e, e}
		shapes[p+"attn_k.weight"] = []uint64{e, kvDim}
		shapes[p+"attn_v.weight"] = []uint64{e, kvDim}
		shapes[p+"attn_output.weight"] = []uint64{e, e}
		shapes[p+"ffn_norm.weight"] = []uint64{e}
		shapes[p+"ffn_gate.weight"] = []uint64{e, f}
		shapes[p+"ffn_up.weight"] = []uint64{e, f}
		shapes[p+"ffn_down.weight"] = []uint64{f, e}
	}
	return shapes
}

// WriteFile writes the model to path as GGUF, replacing any file there. The
// file appears whole or not at all: it is written beside path and renamed.
func WriteFile(path string, opts Options) error {
	shapes := TensorShapes()
	ts := make([]*ggml.Tensor, 0, len(shapes))
	for name, shape := range shapes {
		ts = append(ts, &ggml.Tensor{
			Name:     name,
			Kind:     uint32(ggml.TensorTypeF32),
			Shape:    shape,
			WriterTo: newTensorData(opts, name, shape),
		})
	}
	return writeAtomically(path, KV(opts), ts)
}

// steerDim is the embedding dimension that carries the steering signal.
const steerDim = 0

// tensorData is one tensor's values, computed when written. WriteGGUF writes
// tensors concurrently, so each draws from its own source, seeded from the
// model seed and the tensor's name: the bytes do not depend on the order
// or the interleaving of the writes.
type tensorData struct {
	name    string
	shape   []uint64
	seed1   uint64
	seed2   uint64
	endless bool
}

func newTensorData(opts Options, name string, shape []uint64) *tensorData {
	h := fnv.New64a()
	_, _ = h.Write([]byte(name))
	return &tensorData{name: name, shape: shape, seed1: opts.Seed, seed2: h.Sum64(), endless: opts.Endless}
}

// values returns the tensor's elements in ggml order (first dimension
// varies fastest).
//
// Norm weights are 1. Other weights are normal with a small deviation,
// except that dimension steerDim steers sampling: every token embedding
// has a large constant component there, which survives the random layers
// and the final RMS norm, and the output weights in that dimension are +1
// for the normal pieces and </s> and -1 for everything else (</s> too when
// endless). So the model emits words, never raw bytes; the candidates'
// logits differ only by a little noise, so nearly all of them stay inside
// Ollama's default top_p nucleus and </s> ends a generation about one time
// in 32.
func (t *tensorData) values() []float32 {
	n := uint64(1)
	for _, d := range t.shape {
		n *= d
	}
	out := make([]float32, n)
	if len(t.shape) == 1 { // a norm
		for i := range out {
			out[i] = 1
		}
		return out
	}

	rng := rand.New(rand.NewPCG(t.seed1, t.seed2))
	std := 0.02
	switch t.name {
	case "token_embd.weight":
		std = 0.05
	case "output.weight":
		std = 0.002
	}
	for i := range out {
		out[i] = float32(rng.NormFloat64() * std)
	}

	rows := t.shape[0]
	switch t.name {
	case "token_embd.weight":
		for tok := uint64(0); tok < t.shape[1]; tok++ {
			out[tok*rows+steerDim] = 0.5
		}
	case "output.weight":
		for tok := uint64(0); tok < t.shape[1]; tok++ {
			w := float32(-1)
			switch {
			case tok == EOSID && !t.endless:
				w = 1
			case tok >= 3+256:
				w = 1
			}
			out[tok*rows+steerDim] = w
		}
	}
	return out
}

// WriteTo writes the tensor's values as little-endian float32.
func (t *tensorData) WriteTo(w io.Writer) (int64, error) { return writeFloats(w, t.name, t.values()) }

// writeFloats writes vals, tensor name's values, as little-endian float32.
func writeFloats(w io.Writer, name string, vals []float32) (int64, error) {
	buf := make([]byte, 4*len(vals))
	for i, v := range vals {
		binary.LittleEndian.PutUint32(buf[4*i:], math.Float32bits(v))
	}
	n, err := w.Write(buf)
	if err == nil && n != len(buf) {
		err = io.ErrShortWrite
	}
	if err != nil {
		return int64(n), fmt.Errorf("tensor %s: %w", name, err)
	}
	return int64(n), nil
}
