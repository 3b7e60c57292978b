// Command sousctl is the producer side of sous: it publishes prompts to the
// request queue and prints the results as they come back.
//
//	sousctl publish "Why is the sky blue?" "Write a haiku"
//	sousctl publish -json -f prompts.jsonl
//	echo '{"messages":[{"role":"user","content":"hi"}]}' | sousctl publish -f -
//	sousctl dlq list
//	sousctl dlq replay q-17
//	sousctl batch create -f requests.jsonl -wait -o results.jsonl
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

const usage = `usage: sousctl <command> [flags] [arguments]

Commands:
  publish   publish prompts (or JSON request lines) to the sous request queue
            and print the results as they come back
  dlq       list, show and replay the worker's dead letters (RabbitMQ)
  batch     run OpenAI Batch API jobs through the gateway: upload a JSON
            lines file, watch the batch, download its results
  help      print this text

Run "sousctl publish -h", "sousctl dlq -h" or "sousctl batch -h" for their
flags. Example:

  sousctl publish "Why is the sky blue?" "Write a haiku about queues"
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	code := run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run dispatches to a command and returns the exit code: 0 done, 1 a
// request failed, the broker or the gateway did, 2 a usage error, 130 interrupted.
func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "publish":
		return publish(ctx, args[1:], stdin, stdout, stderr)
	case "dlq":
		warnUnknownEnv(stderr, os.Environ())
		return dlq(ctx, args[1:], stdout, stderr)
	case "batch":
		warnUnknownEnv(stderr, os.Environ())
		return batch(ctx, args[1:], stdout, stderr)
	case "help", "-h", "-help", "--help":
		if len(args) > 1 && args[1] == "publish" {
			return publish(ctx, []string{"-h"}, stdin, stdout, stderr)
		}
		if len(args) > 1 && args[1] == "dlq" {
			return dlq(ctx, []string{"-h"}, stdout, stderr)
		}
		if len(args) > 1 && args[1] == "batch" {
			return batch(ctx, []string{"-h"}, stdout, stderr)
		}
		fmt.Fprint(stdout, usage)
		return 0
	}
	fmt.Fprintf(stderr, "sousctl: unknown command %q\n\n%s", args[0], usage)
	return 2
}
