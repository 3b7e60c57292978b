package soustest_test

import (
	"context"
	"fmt"
	"time"

	"github.com/testcontainers/testcontainers-go"

	"github.com/sous-run/sous/soustest"
)

// Start a worker that runs its own engine (the worker-ollama image, here
// the dev build with the tiny model) on the broker a test already has, and
// ask it something. Docker engines with a bridge network don't need
// WithHostNetwork; give the broker's address as the container sees it
// (WithAMQPURL) and as the test sees it (WithClientAMQPURL).
func ExampleRun() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	c, err := soustest.Run(ctx, "sous-worker-ollama:dev",
		soustest.WithHostNetwork(),
		soustest.WithAMQPURL("amqp://guest:guest@127.0.0.1:5672/"),
		soustest.WithQueue("soustest.example"),
		soustest.WithModel("tiny-scripted"), // exact answers; "tiny" says gibberish, or nothing
		soustest.WithMaxNumPredict(16),
	)
	defer testcontainers.TerminateContainer(c) // in a test: testcontainers.CleanupContainer(t, c)
	if err != nil {
		fmt.Println(err)
		return
	}
	res, err := c.Prompt(ctx, "Why is the sky blue?")
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(res.Status, res.Model, res.Response)
	// Output: ok tiny-scripted The sky is blue because air scatters blue light more than red light.
}
