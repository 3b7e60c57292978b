package tinymodel_test

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/sous-run/sous/internal/tinymodel"
)

func ExampleWriteFile() {
	dir, err := os.MkdirTemp("", "tinymodel")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer os.RemoveAll(dir)

	path := filepath.Join(dir, "tiny.gguf")
	if err := tinymodel.WriteFile(path, tinymodel.Options{Seed: 1}); err != nil {
		fmt.Println(err)
		return
	}
	// An Ollama Modelfile then says: FROM <path>
	fmt.Println(tinymodel.VocabSize, "tokens,", tinymodel.BlockCount, "blocks")
	// Output: 290 tokens, 2 blocks
}
