// Command sousctl is the producer side of sous: it publishes prompts to the
// request queue and prints the results as they come back.
//
//	sousctl publish "Why is the sky blue?" "Write a haiku"
//	sousctl publish -f prompts.jsonl --json
//	echo '{"messages":[{"role":"user","content":"hi"}]}' | sousctl publish -f -
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

const usage = `usage: sousctl publish [flags] [prompt ...]

Publishes each prompt (or each JSON request line of -f FILE, "-" for stdin)
to the sous request queue, waits for the results on RabbitMQ's direct
reply-to and prints them. Run "sousctl publish -h" for the flags.
`

func main() {
	if len(os.Args) < 2 || os.Args[1] != "publish" {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	code := publish(ctx, os.Args[2:], os.Stdin, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
