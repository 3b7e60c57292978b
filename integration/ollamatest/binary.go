package ollamatest

import (
	"context"
	"net"
	"path/filepath"
	"strconv"
)

// Binary returns the ollama binary the package would run: $SOUS_OLLAMA_BIN,
// else <repo root>/.cache/bin/ollama. Its error says to run `make ollama`.
func Binary() (string, error) { return findBinary("") }

// Serve is what a caller needs to run `ollama serve` itself (a supervisor
// under test) on the tiny models: the binary, a free loopback address, and
// the environment that points the server at both.
type Serve struct {
	Bin  string
	Addr string   // 127.0.0.1:port
	Env  []string // OLLAMA_HOST, OLLAMA_MODELS, HOME
}

// Prepare creates the models in dir as Start does, stops that server, and
// returns how to serve them again.
func Prepare(ctx context.Context, dir string) (Serve, error) {
	srv, err := Start(ctx, Options{Dir: dir})
	if err != nil {
		return Serve{}, err
	}
	if err := srv.Stop(ctx); err != nil {
		return Serve{}, err
	}
	bin, err := Binary()
	if err != nil {
		return Serve{}, err
	}
	port, err := freePort()
	if err != nil {
		return Serve{}, err
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	return Serve{Bin: bin, Addr: addr, Env: []string{"OLLAMA_HOST=" + addr, "OLLAMA_MODELS=" + filepath.Join(dir, "models"), "HOME=" + filepath.Join(dir, "home")}}, nil
}
