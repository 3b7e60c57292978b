// Package soustest starts a sous worker container for tests, with
// testcontainers-go, next to the broker and inference engine a test already
// has, and publishes prompts to it.
//
// It follows the layout of testcontainers-go's own modules: Run takes the
// image and options and returns a *Container that embeds
// testcontainers.Container; every setting of the worker (SOUS_*) is an
// option (With... for the common ones, WithSetting for any of them); Run
// returns once /readyz answers 200, that is once the worker holds its
// broker connection and its engine answers with the model loaded.
//
//	c, err := soustest.Run(ctx, "sous-worker:dev",
//		soustest.WithAMQPURL("amqp://guest:guest@rabbitmq:5672/"),
//		soustest.WithEngineURL("http://ollama:11434"),
//		soustest.WithModel("llama3.2"),
//	)
//	testcontainers.CleanupContainer(t, c)
//	res, err := c.Prompt(ctx, "Why is the sky blue?")
//
// Prompt and Publish/Await talk to the broker from the test process, with
// the URL given by WithClientAMQPURL (default: the worker's). Results come
// back on a private reply queue the container's client declares.
//
// WithHostNetwork runs the container in the host's network namespace, for
// engines without a bridge network (and CI machines whose Docker has none):
// the worker's HTTP port and, for the worker-ollama image, the engine's port
// are then picked free on 127.0.0.1.
//
// Concurrency: a *Container's methods are safe for concurrent use. Terminate
// (or testcontainers.CleanupContainer) closes the broker connection the
// helpers opened and removes the container.
package soustest
