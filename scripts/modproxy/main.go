// Command modproxy serves this machine's Go module cache as a module proxy on
// a loopback address, so that `docker build --network host` (scripts/images.sh)
// downloads go.mod's modules from it instead of from the internet.
//
//	modproxy -dir "$(go env GOMODCACHE)/cache/download" [-addr 127.0.0.1:0]
//
// The cache's download directory has the GOPROXY protocol's layout
// (<module>/@v/list, .info, .mod, .zip); `go mod download` on the host fills
// it. modproxy prints one line, GOPROXY=http://ADDR, once it listens, and
// serves until SIGINT or SIGTERM. Only GET and HEAD are answered.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "modproxy:", err)
		os.Exit(1)
	}
}

func run() error {
	dir := flag.String("dir", "", "the module cache's download directory, $(go env GOMODCACHE)/cache/download")
	addr := flag.String("addr", "127.0.0.1:0", "loopback address to listen on")
	flag.Parse()
	if *dir == "" {
		return errors.New("-dir is required: pass $(go env GOMODCACHE)/cache/download")
	}
	if st, err := os.Stat(*dir); err != nil || !st.IsDir() {
		return fmt.Errorf("-dir %s is not a directory; run `go mod download` first", *dir)
	}
	host, _, err := net.SplitHostPort(*addr)
	if err != nil {
		return fmt.Errorf("-addr %q: %w", *addr, err)
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("-addr %q: listen on a loopback address only", *addr)
	}
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}
	files := http.FileServer(http.Dir(*dir))
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method != http.MethodGet && r.Method != http.MethodHead {
				http.Error(w, "read-only", http.StatusMethodNotAllowed)
				return
			}
			files.ServeHTTP(w, r)
		}),
		ReadHeaderTimeout: 10 * time.Second,
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	fmt.Printf("GOPROXY=http://%s\n", ln.Addr())
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return srv.Shutdown(shutdown)
}
