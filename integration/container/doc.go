// Package container holds the tests of the Docker images: the images
// `make images` builds (scripts/images.sh, on stand-in bases) run as
// containers, with testcontainers-go, against a real RabbitMQ and a real
// Ollama, on the host's network (loopback only).
//
//   - the worker image runs as uid 65532 and answers prompts through the
//     local broker and the dev Ollama;
//   - the worker-ollama image runs `ollama serve` as the worker's child,
//     with the tiny model the stand-in carries, and answers;
//   - `docker stop` drains within the grace period and loses nothing;
//   - a RabbitMQ container (Debian's rabbitmq-server, on its own ports) and
//     the worker container, both started with testcontainers-go, pass the
//     end-to-end checks;
//   - `make push` (BASES=standin) pushes the three images to a CNCF
//     distribution registry on loopback, built from its Go module, and each
//     printed digest is an image index that `docker pull` takes back.
//
// Where no Docker engine answers the tests skip with one line saying why;
// with CI=true they fail instead (integration/containertest).
package container
