package deploy_test

import (
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/moby/buildkit/frontend/dockerfile/instructions"
	"github.com/moby/buildkit/frontend/dockerfile/shell"
)

// The engines other than Ollama (issue 27): vLLM's and llama.cpp's
// servers in the worker's own container. Their images cannot be pulled
// here, so their stages are checked statically; the static worker they
// carry is built and run.

const nocgoStage = "build-nocgo"

// engineStage says what an engine stage must hold: the flag of the
// engine command that names the model the worker asks for.
var engineStages = map[string]struct{ modelFlag string }{
	"worker-vllm":     {"--served-model-name"},
	"worker-llamacpp": {"--alias"},
}

// makeRecipe returns the expanded one-line recipe of target.
func makeRecipe(makefile []byte, target string) (string, error) {
	renamed := strings.Replace(string(makefile), "\nbuild:", "\nbuild-cgo-main:", 1)
	renamed = strings.Replace(renamed, "\n"+target+":", "\nbuild:", 1)
	return makeBuildCommand([]byte(renamed))
}

func checkEngineStages(in dockerInputs) []error {
	stages, errs := dockerfileStages(in.files["Dockerfile"])
	if stages == nil {
		return errs
	}
	byName := map[string]*instructions.Stage{}
	for i := range stages {
		byName[stages[i].Name] = &stages[i]
	}
	cgo, err := makeBuildCommand(in.files["Makefile"])
	if err != nil {
		return append(errs, err)
	}
	nocgo, err := makeRecipe(in.files["Makefile"], nocgoStage)
	if err != nil {
		return append(errs, err)
	}
	// The same command as the build, without cgo, into bin/nocgo/.
	if want := strings.Replace(strings.Replace(cgo, "CGO_ENABLED=1", "CGO_ENABLED=0", 1), "-o bin/ ", "-o bin/nocgo/ ", 1); normalizeSpace(nocgo) != normalizeSpace(want) {
		errs = append(errs, fmt.Errorf("Makefile: build-nocgo runs %q, want the build command without cgo: %q", nocgo, want))
	}
	b := byName[nocgoStage]
	if b == nil {
		return append(errs, fmt.Errorf("Dockerfile: no stage named %q", nocgoStage))
	}
	if b.BaseName != buildStage {
		errs = append(errs, fmt.Errorf("stage %s: FROM %s, want the %s stage", nocgoStage, b.BaseName, buildStage))
	}
	ran := false
	for _, c := range b.Commands {
		if r, ok := c.(*instructions.RunCommand); ok && normalizeSpace(strings.Join(r.CmdLine, " ")) == "make build-nocgo" {
			ran = true
		}
	}
	if !ran {
		errs = append(errs, fmt.Errorf("stage %s: no RUN make build-nocgo", nocgoStage))
	}
	for name, want := range engineStages {
		st := byName[name]
		if st == nil {
			errs = append(errs, fmt.Errorf("Dockerfile: no stage named %q", name))
			continue
		}
		errs = append(errs, checkEngineStage(st, want.modelFlag)...)
	}
	return errs
}

func checkEngineStage(st *instructions.Stage, modelFlag string) []error {
	var errs []error
	env := map[string]string{}
	var user, entry, worker string
	exposed := false
	lex := shell.NewLex('\\')
	for _, c := range st.Commands {
		switch c := c.(type) {
		case *instructions.EnvCommand:
			for _, kv := range c.Env {
				// ENV values are shell words: quotes are removed at build time.
				v, _, err := lex.ProcessWord(kv.Value, shell.EnvsFromSlice(nil))
				if err != nil {
					errs = append(errs, fmt.Errorf("stage %s: ENV %s: %w", st.Name, kv.Key, err))
				}
				env[kv.Key] = v
			}
		case *instructions.UserCommand:
			user = c.User
		case *instructions.CopyCommand:
			if c.From == nocgoStage && slices.Contains(c.SourcePaths, "/src/bin/nocgo/worker") {
				worker = c.DestPath
			}
		case *instructions.EntrypointCommand:
			if !c.PrependShell && len(c.CmdLine) > 0 {
				entry = c.CmdLine[0]
			}
		case *instructions.ExposeCommand:
			exposed = exposed || slices.Contains(c.Ports, strconv.Itoa(workerPort))
		}
	}
	fail := func(format string, args ...any) { errs = append(errs, fmt.Errorf("stage %s: "+format, append([]any{st.Name}, args...)...)) }
	if err := nonRootUser(user); err != nil {
		fail("%v", err)
	}
	if worker == "" {
		fail("does not COPY --from=%s /src/bin/nocgo/worker (a static worker: the engine image's glibc is older than the build's)", nocgoStage)
	} else if entry != worker {
		fail("ENTRYPOINT %q is not the worker %s", entry, worker)
	}
	if !exposed {
		fail("no EXPOSE %d", workerPort)
	}
	if env["SOUS_ENGINE"] != "openai" {
		fail("SOUS_ENGINE %q, want openai", env["SOUS_ENGINE"])
	}
	args := strings.Fields(env["SOUS_ENGINE_EXEC"])
	flag := func(name string) string {
		i := slices.Index(args, name)
		if i < 0 || i+1 >= len(args) {
			return ""
		}
		return args[i+1]
	}
	u, err := url.Parse(env["SOUS_ENGINE_URL"])
	switch {
	case len(args) == 0:
		fail("no SOUS_ENGINE_EXEC: the engine must be the worker's child")
	case err != nil || u.Hostname() != "127.0.0.1":
		fail("SOUS_ENGINE_URL %q: the engine listens on loopback only", env["SOUS_ENGINE_URL"])
	case flag("--host") != "127.0.0.1":
		fail("SOUS_ENGINE_EXEC %q: --host must be 127.0.0.1, so nothing outside the pod reaches the engine", env["SOUS_ENGINE_EXEC"])
	case flag("--port") != u.Port():
		fail("SOUS_ENGINE_EXEC --port %q is not SOUS_ENGINE_URL's port %q", flag("--port"), u.Port())
	case u.Port() == strconv.Itoa(workerPort):
		fail("the engine's port %s is the worker's own", u.Port())
	case flag(modelFlag) != env["SOUS_MODEL"]:
		fail("SOUS_MODEL %q is not the model the engine serves (%s %q)", env["SOUS_MODEL"], modelFlag, flag(modelFlag))
	}
	if st.Name == "worker-llamacpp" && !slices.Contains(args, "--metrics") {
		fail("llama-server without --metrics: the worker adapts its slots to llamacpp:requests_processing and requests_deferred")
	}
	return errs
}

func TestEngineStages(t *testing.T) {
	t.Parallel()
	if errs := checkEngineStages(dockerSetup(t)); len(errs) > 0 {
		t.Fatalf("%d problems:\n%v", len(errs), errors.Join(errs...))
	}
}

func TestEngineStageChecksCatchBrokenCopies(t *testing.T) {
	t.Parallel()
	good := dockerSetup(t)
	const df = "Dockerfile"
	for _, c := range []struct {
		name string
		m    mutation
		want string
	}{
		{"cgo worker in an old glibc", mutation{df, "COPY --from=build-nocgo /src/bin/nocgo/worker /usr/local/bin/sous-worker\nCOPY --from=build-nocgo /src/bin/nocgo/sousctl /usr/local/bin/sousctl\nENV SOUS_ENGINE=openai \\\n    SOUS_ENGINE_URL=http://127.0.0.1:8000", "COPY --from=build /src/bin/worker /usr/local/bin/sous-worker\nCOPY --from=build-nocgo /src/bin/nocgo/sousctl /usr/local/bin/sousctl\nENV SOUS_ENGINE=openai \\\n    SOUS_ENGINE_URL=http://127.0.0.1:8000"}, "stage worker-vllm: does not COPY --from=build-nocgo"},
		{"engine on every interface", mutation{df, "--host 127.0.0.1 --port 8000", "--host 0.0.0.0 --port 8000"}, "--host must be 127.0.0.1"},
		{"port mismatch", mutation{df, "SOUS_ENGINE_URL=http://127.0.0.1:8090", "SOUS_ENGINE_URL=http://127.0.0.1:8091"}, `--port "8090" is not SOUS_ENGINE_URL's port "8091"`},
		{"model mismatch", mutation{df, "--served-model-name model", "--served-model-name qwen"}, `SOUS_MODEL "model" is not the model the engine serves (--served-model-name "qwen")`},
		{"no metrics", mutation{df, "--port 8090 --metrics", "--port 8090"}, "without --metrics"},
		{"nocgo drifts", mutation{"Makefile", "CGO_ENABLED=0 $(GO) build $(GO_BUILD_FLAGS) -o bin/nocgo/", "CGO_ENABLED=0 $(GO) build -o bin/nocgo/"}, "build-nocgo runs"},
	} {
		t.Run(c.name, func(t *testing.T) {
			in := good
			in.files = c.m.apply(t, good.files)
			requireErr(t, checkEngineStages(in), c.want)
		})
	}
}

// The static worker the engine images carry builds from this tree and
// runs: it names a bad setting and exits 2, as the cgo one does.
func TestStaticWorkerRuns(t *testing.T) {
	t.Parallel()
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "worker")
	build := exec.Command("go", "build", "-trimpath", "-o", bin, "./cmd/worker")
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("CGO_ENABLED=0 go build ./cmd/worker: %v\n%s", err, out)
	}
	run := exec.Command(bin)
	run.Env = []string{"SOUS_ENGINE=openai", "SOUS_ENGINE_URL=ftp://127.0.0.1:8000"}
	out, err := run.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 2 || !strings.Contains(string(out), "SOUS_ENGINE_URL") {
		t.Fatalf("the static worker with a bad SOUS_ENGINE_URL: %v\n%s", err, out)
	}
}
