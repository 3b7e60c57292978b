package tinymodel_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/ollama/ollama/fs/ggml"

	"github.com/sous-run/sous/internal/tinymodel"
)

// write writes the model with opts into a temp dir and returns its path.
func write(t *testing.T, opts tinymodel.Options) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "tiny.gguf")
	if err := tinymodel.WriteFile(path, opts); err != nil {
		t.Fatalf("WriteFile: %v", err)
	}
	return path
}

// decode reads the file back with the ollama module's own GGUF reader.
func decode(t *testing.T, path string) (*ggml.GGML, *os.File) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.Close() })
	g, err := ggml.Decode(f, -1)
	if err != nil {
		t.Fatalf("ggml.Decode: %v", err)
	}
	return g, f
}

func TestWriteFileDecodes(t *testing.T) {
	t.Parallel()
	path := write(t, tinymodel.Options{ContextLength: 1024})
	g, f := decode(t, path)
	kv := g.KV()

	if got := kv.Architecture(); got != "llama" {
		t.Errorf("architecture = %q, want llama", got)
	}
	for _, c := range []struct {
		key  string
		got  uint64
		want uint64
	}{
		{"context_length", kv.ContextLength(), 1024},
		{"embedding_length", kv.EmbeddingLength(), tinymodel.EmbeddingLength},
		{"block_count", kv.BlockCount(), tinymodel.BlockCount},
		{"attention.head_count", kv.HeadCountMax(), tinymodel.HeadCount},
		{"attention.head_count_kv", kv.HeadCountKVMax(), tinymodel.HeadCountKV},
		{"feed_forward_length", uint64(kv.Uint("feed_forward_length")), tinymodel.FeedForwardLength},
		{"bos", uint64(kv.Uint("tokenizer.ggml.bos_token_id")), tinymodel.BOSID},
		{"eos", uint64(kv.Uint("tokenizer.ggml.eos_token_id")), tinymodel.EOSID},
	} {
		if c.got != c.want {
			t.Errorf("%s = %d, want %d", c.key, c.got, c.want)
		}
	}
	if eps := kv.Float("attention.layer_norm_rms_epsilon"); eps <= 0 || eps > 1e-3 {
		t.Errorf("layer_norm_rms_epsilon = %g, want a small positive number", eps)
	}
	if got := kv.String("tokenizer.ggml.model"); got != "llama" {
		t.Errorf("tokenizer.ggml.model = %q, want llama", got)
	}

	toks := kv.Strings("tokenizer.ggml.tokens")
	types := kv.Ints("tokenizer.ggml.token_type")
	scores := kv.Floats("tokenizer.ggml.scores")
	if len(toks) != tinymodel.VocabSize || len(types) != len(toks) || len(scores) != len(toks) {
		t.Fatalf("tokens/types/scores = %d/%d/%d, want %d each", len(toks), len(types), len(scores), tinymodel.VocabSize)
	}
	if !slices.Equal(toks, tinymodel.Tokens()) {
		t.Errorf("tokens differ from Tokens()")
	}
	if toks[0] != "<unk>" || toks[1] != "<s>" || toks[2] != "</s>" {
		t.Errorf("special tokens = %q", toks[:3])
	}
	for b := range 256 {
		if want := []byte(toks[3+b]); !bytes.Equal(want, fmt.Appendf(nil, "<0x%02X>", b)) || types[3+b] != 6 {
			t.Fatalf("byte token %d = %q type %d, want <0x%02X> type 6", b, toks[3+b], types[3+b], b)
		}
	}
	for i := 3 + 256; i < len(toks); i++ {
		if types[i] != 1 {
			t.Errorf("token %d %q type %d, want 1 (normal)", i, toks[i], types[i])
		}
	}

	want := tinymodel.TensorShapes()
	items := g.Tensors().Items()
	if len(items) != len(want) {
		t.Errorf("%d tensors, want %d", len(items), len(want))
	}
	for _, tt := range items {
		shape, ok := want[tt.Name]
		if !ok {
			t.Errorf("unexpected tensor %q", tt.Name)
			continue
		}
		if !slices.Equal(tt.Shape, shape) {
			t.Errorf("%s shape = %v, want %v", tt.Name, tt.Shape, shape)
		}
		if tt.Kind != uint32(ggml.TensorTypeF32) {
			t.Errorf("%s kind = %d, want F32", tt.Name, tt.Kind)
		}
	}
	if got := []uint64{tinymodel.EmbeddingLength, uint64(tinymodel.VocabSize)}; !slices.Equal(want["token_embd.weight"], got) {
		t.Errorf("token_embd.weight shape = %v, want %v (ggml order)", want["token_embd.weight"], got)
	}

	// The data lies where the header says: norms read back as ones, and
	// the file ends with the last tensor.
	var end uint64
	for _, tt := range items {
		vals := readTensor(t, f, int64(g.Tensors().Offset+tt.Offset), tt.Elements())
		if len(tt.Shape) == 1 {
			for i, v := range vals {
				if v != 1 {
					t.Fatalf("%s[%d] = %g, want 1", tt.Name, i, v)
				}
			}
		} else if slices.Max(vals) == slices.Min(vals) {
			t.Errorf("%s is constant %g, want random", tt.Name, vals[0])
		}
		end = max(end, g.Tensors().Offset+tt.Offset+tt.Size())
	}
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	if uint64(st.Size()) != end {
		t.Errorf("file is %d bytes, tensors end at %d", st.Size(), end)
	}
	if st.Size() > 1<<20 {
		t.Errorf("file is %d bytes, want under 1 MiB", st.Size())
	}
}

func readTensor(t *testing.T, r io.ReaderAt, off int64, n uint64) []float32 {
	t.Helper()
	buf := make([]byte, 4*n)
	if _, err := r.ReadAt(buf, off); err != nil {
		t.Fatalf("read tensor at %d: %v", off, err)
	}
	vals := make([]float32, n)
	for i := range vals {
		vals[i] = math.Float32frombits(binary.LittleEndian.Uint32(buf[4*i:]))
		if math.IsNaN(float64(vals[i])) || math.IsInf(float64(vals[i]), 0) {
			t.Fatalf("value %d at %d is %g", i, off, vals[i])
		}
	}
	return vals
}

func TestWriteFileDeterministic(t *testing.T) {
	t.Parallel()
	read := func(opts tinymodel.Options) []byte {
		b, err := os.ReadFile(write(t, opts))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	a := read(tinymodel.Options{Seed: 7})
	tests := []struct {
		name string
		opts tinymodel.Options
		same bool
	}{
		{"same seed", tinymodel.Options{Seed: 7}, true},
		{"other seed", tinymodel.Options{Seed: 8}, false},
		{"endless", tinymodel.Options{Seed: 7, Endless: true}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := bytes.Equal(a, read(tc.opts)); got != tc.same {
				t.Errorf("bytes equal = %v, want %v", got, tc.same)
			}
		})
	}
}

func TestWriteFileReplacesAtomically(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	path := filepath.Join(dir, "tiny.gguf")
	if err := os.WriteFile(path, []byte("old"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := tinymodel.WriteFile(path, tinymodel.Options{}); err != nil {
		t.Fatal(err)
	}
	decode(t, path)
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 {
		t.Errorf("dir holds %d entries, want only the model (no temp file left)", len(entries))
	}

	if err := tinymodel.WriteFile(filepath.Join(dir, "missing", "tiny.gguf"), tinymodel.Options{}); err == nil {
		t.Error("WriteFile into a missing dir: want an error")
	}
}

func BenchmarkWriteFile(b *testing.B) {
	path := filepath.Join(b.TempDir(), "tiny.gguf")
	for b.Loop() {
		if err := tinymodel.WriteFile(path, tinymodel.Options{}); err != nil {
			b.Fatal(err)
		}
	}
}
