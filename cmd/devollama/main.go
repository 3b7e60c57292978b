// Command devollama runs the dev Ollama server with the tiny random-weight
// model, for `make demo` and for trying sous by hand.
//
// It starts `ollama serve` (built by `make ollama`) on 127.0.0.1, creates
// the model, prints one line to stdout once the model answers:
//
//	OLLAMA_URL=http://127.0.0.1:PORT MODEL=tiny
//
// and then runs until SIGINT or SIGTERM, when it stops the server and
// removes its files (unless -dir was given). Logs go to stderr.
//
// Flags, each defaulting to an environment variable:
//
//	-port      SOUS_DEV_OLLAMA_PORT      port on 127.0.0.1; 0 picks a free one (default 0)
//	-parallel  SOUS_DEV_OLLAMA_PARALLEL  OLLAMA_NUM_PARALLEL (default 4)
//	-threads   SOUS_DEV_OLLAMA_THREADS   the model's num_thread; -1 leaves it to Ollama (default 1)
//	-aliases   SOUS_DEV_OLLAMA_ALIASES   comma-separated extra names for the model
//	-dir       SOUS_DEV_OLLAMA_DIR       keep models and log here (default: a temp dir)
//	-bin       SOUS_OLLAMA_BIN           the ollama binary (default .cache/bin/ollama)
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sous-run/sous/integration/ollamatest"
)

// Budgets for starting and stopping the server.
const (
	startTimeout = 2 * time.Minute
	stopTimeout  = 15 * time.Second
)

type config struct {
	port     int
	parallel int
	threads  int
	aliases  []string
	dir      string
	bin      string
}

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "devollama:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	cfg, err := parseConfig(args, os.Getenv)
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	startCtx, cancel := context.WithTimeout(ctx, startTimeout)
	srv, err := ollamatest.Start(startCtx, ollamatest.Options{
		Bin:         cfg.bin,
		Dir:         cfg.dir,
		Port:        cfg.port,
		NumParallel: cfg.parallel,
		Threads:     cfg.threads,
		Aliases:     cfg.aliases,
		Logger:      log,
	})
	cancel()
	if err != nil {
		return err
	}
	fmt.Printf("OLLAMA_URL=%s MODEL=%s\n", srv.URL(), srv.Model())

	<-ctx.Done()
	log.Info("stopping", "url", srv.URL())
	stopCtx, cancel := context.WithTimeout(context.Background(), stopTimeout)
	defer cancel()
	return srv.Stop(stopCtx)
}

// parseConfig reads flags, whose defaults come from the environment.
func parseConfig(args []string, getenv func(string) string) (config, error) {
	var cfg config
	envInt := func(name string, def int) (int, error) {
		v := getenv(name)
		if v == "" {
			return def, nil
		}
		n, err := strconv.Atoi(v)
		if err != nil {
			return 0, fmt.Errorf("%s=%q: want an integer", name, v)
		}
		return n, nil
	}
	port, err := envInt("SOUS_DEV_OLLAMA_PORT", 0)
	if err != nil {
		return cfg, err
	}
	parallel, err := envInt("SOUS_DEV_OLLAMA_PARALLEL", 4)
	if err != nil {
		return cfg, err
	}
	threads, err := envInt("SOUS_DEV_OLLAMA_THREADS", 1)
	if err != nil {
		return cfg, err
	}

	fs := flag.NewFlagSet("devollama", flag.ContinueOnError)
	fs.IntVar(&cfg.port, "port", port, "port on 127.0.0.1; 0 picks a free one (env SOUS_DEV_OLLAMA_PORT)")
	fs.IntVar(&cfg.parallel, "parallel", parallel, "OLLAMA_NUM_PARALLEL: requests served at once (env SOUS_DEV_OLLAMA_PARALLEL)")
	fs.IntVar(&cfg.threads, "threads", threads, "the model's num_thread; -1 leaves it to Ollama (env SOUS_DEV_OLLAMA_THREADS)")
	aliases := fs.String("aliases", getenv("SOUS_DEV_OLLAMA_ALIASES"), "comma-separated extra names for the model (env SOUS_DEV_OLLAMA_ALIASES)")
	fs.StringVar(&cfg.dir, "dir", getenv("SOUS_DEV_OLLAMA_DIR"), "keep models and server.log here; default a temp dir removed on exit (env SOUS_DEV_OLLAMA_DIR)")
	fs.StringVar(&cfg.bin, "bin", getenv(ollamatest.BinEnv), "the ollama binary; default <repo>/.cache/bin/ollama (env "+ollamatest.BinEnv+")")
	if err := fs.Parse(args); err != nil {
		return cfg, err
	}
	if fs.NArg() > 0 {
		return cfg, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if cfg.port < 0 || cfg.port > 65535 {
		return cfg, fmt.Errorf("-port %d: want 0..65535", cfg.port)
	}
	if cfg.parallel < 1 {
		return cfg, fmt.Errorf("-parallel %d: want at least 1", cfg.parallel)
	}
	if cfg.threads == 0 || cfg.threads < -1 {
		return cfg, fmt.Errorf("-threads %d: want at least 1, or -1", cfg.threads)
	}
	for _, a := range strings.Split(*aliases, ",") {
		if a = strings.TrimSpace(a); a != "" {
			cfg.aliases = append(cfg.aliases, a)
		}
	}
	if cfg.dir != "" {
		if err := os.MkdirAll(cfg.dir, 0o755); err != nil {
			return cfg, fmt.Errorf("-dir: %w", err)
		}
	}
	return cfg, nil
}
