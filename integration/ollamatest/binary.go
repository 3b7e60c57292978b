package ollamatest

// Binary returns the ollama binary the package would run: $SOUS_OLLAMA_BIN,
// else <repo root>/.cache/bin/ollama. Its error says to run `make ollama`.
func Binary() (string, error) { return findBinary("") }
