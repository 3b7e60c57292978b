package deploy_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"go/version"
	"maps"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/distribution/reference"
	"github.com/moby/buildkit/frontend/dockerfile/instructions"
	"github.com/moby/buildkit/frontend/dockerfile/linter"
	"github.com/moby/buildkit/frontend/dockerfile/parser"
	"github.com/moby/buildkit/frontend/dockerfile/shell"
	"github.com/moby/patternmatcher"
	"github.com/moby/patternmatcher/ignorefile"
	"golang.org/x/mod/modfile"
)

// These checks keep the Dockerfile honest without a Docker engine; the
// container tests (integration/container) build and run it where one answers.

const (
	buildStage   = "build"
	workerBinary = "worker" // the ./cmd/worker package, built by the Makefile
)

// finalStages are the image targets users build; each must run as non-root.
var finalStages = []string{"worker", "worker-ollama"}

// dockerInputs are the files the Dockerfile checks read, by repo-root path.
type dockerInputs struct {
	files tree
	// moduleDir returns the source directory of a Go module version (the
	// Ollama release whose Dockerfile gives its image's base).
	moduleDir func(path, version string) (string, error)
}

// dockerfileStages parses a Dockerfile with BuildKit's own parser and
// instruction parser, and fails on any warning or lint finding BuildKit
// reports while doing so (a `docker build --check` subset).
func dockerfileStages(b []byte) ([]instructions.Stage, []error) {
	res, err := parser.Parse(bytes.NewReader(b))
	if err != nil {
		return nil, []error{fmt.Errorf("Dockerfile: %w", err)}
	}
	var errs []error
	for _, w := range res.Warnings {
		errs = append(errs, fmt.Errorf("Dockerfile:%d: %s", w.Location.Start.Line, w.Short))
	}
	lint := linter.New(&linter.Config{Warn: func(rule, _, _, msg string, loc []parser.Range) {
		line := 0
		if len(loc) > 0 {
			line = loc[0].Start.Line
		}
		errs = append(errs, fmt.Errorf("Dockerfile:%d: lint %s: %s", line, rule, msg))
	}})
	stages, metaArgs, err := instructions.Parse(res.AST, lint)
	if err != nil {
		return nil, append(errs, fmt.Errorf("Dockerfile: %w", err))
	}
	errs = append(errs, expandBases(stages, metaArgs)...)
	return stages, errs
}

// expandBases replaces a base given as a build argument (FROM ${GO_IMAGE})
// with the argument's default, the image a plain `docker build` uses: the
// checks then apply to the real base. An argument without a default is
// refused, so that what the checks see is what gets pulled.
func expandBases(stages []instructions.Stage, metaArgs []instructions.ArgCommand) []error {
	defaults := map[string]string{}
	for _, a := range metaArgs {
		for _, kv := range a.Args {
			if kv.Value != nil {
				defaults[kv.Key] = *kv.Value
			} else {
				delete(defaults, kv.Key)
			}
		}
	}
	var errs []error
	lex := shell.NewLex('\\')
	for i, st := range stages {
		if !strings.Contains(st.BaseName, "$") {
			continue
		}
		env := make([]string, 0, len(defaults))
		for k, v := range defaults {
			env = append(env, k+"="+v)
		}
		base, unset, err := lex.ProcessWord(st.BaseName, shell.EnvsFromSlice(env))
		if err != nil {
			errs = append(errs, fmt.Errorf("stage %s: base %q: %w", st.Name, st.BaseName, err))
			continue
		}
		for _, name := range slices.Sorted(maps.Keys(unset)) {
			errs = append(errs, fmt.Errorf("stage %s: base %q uses ARG %s, which has no default before the first FROM; default it to the real, pinned image", st.Name, st.BaseName, name))
		}
		stages[i].BaseName = base
	}
	return errs
}

// checkDockerfile applies every Dockerfile rule and returns what is wrong.
func checkDockerfile(in dockerInputs) []error {
	stages, errs := dockerfileStages(in.files["Dockerfile"])
	if stages == nil {
		return errs
	}
	byName := map[string]*instructions.Stage{}
	for i := range stages {
		byName[stages[i].Name] = &stages[i]
	}
	for _, name := range append([]string{buildStage}, finalStages...) {
		if byName[name] == nil {
			errs = append(errs, fmt.Errorf("Dockerfile: no stage named %q", name))
		}
	}
	if len(errs) > 0 {
		return errs
	}

	for _, st := range stages {
		errs = append(errs, checkStageBase(st, byName)...)
		errs = append(errs, checkNoSecrets(st)...)
		for _, c := range st.Commands {
			if _, ok := c.(*instructions.HealthCheckCommand); ok {
				errs = append(errs, fmt.Errorf("stage %s: HEALTHCHECK is ignored by Kubernetes; the Deployment's probes do that job", st.Name))
			}
		}
	}

	cmd, err := makeBuildCommand(in.files["Makefile"])
	if err != nil {
		return append(errs, err)
	}
	outputs, berrs := checkBuildStage(byName[buildStage], cmd)
	errs = append(errs, berrs...)
	for _, name := range finalStages {
		errs = append(errs, checkFinalStage(byName[name], outputs)...)
	}
	errs = append(errs, checkOllamaStage(byName["worker-ollama"], in)...)
	errs = append(errs, checkGoVersion(byName[buildStage], in.files["go.mod"])...)
	errs = append(errs, checkGlibc(byName, in)...)
	errs = append(errs, checkDockerignore(in.files[".dockerignore"])...)
	return errs
}

// imageRef parses a stage's base image (a build argument's default, as
// expandBases left it).
func imageRef(st instructions.Stage) (reference.Named, error) {
	ref, err := reference.ParseNormalizedNamed(st.BaseName)
	if err != nil {
		return nil, fmt.Errorf("stage %s: base %q: %w", st.Name, st.BaseName, err)
	}
	return ref, nil
}

var (
	versionTag        = regexp.MustCompile(`^v?[0-9]+(\.[0-9]+)+`)
	distrolessRelease = regexp.MustCompile(`-debian[0-9]+$`)
	makeAssign        = regexp.MustCompile(`^([A-Za-z_][A-Za-z0-9_]*)\s*(\?=|:=|=)\s*(.*)$`)
	makeVarRef        = regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)
)

// checkStageBase: base images are pinned. A reference is pinned when it has a
// digest or a tag that starts with a version number. Distroless publishes no
// version tags; there the Debian release in the repository name
// (base-debian12) is the version and the tag picks the variant.
func checkStageBase(st instructions.Stage, stages map[string]*instructions.Stage) []error {
	if _, ok := stages[st.BaseName]; ok {
		return nil // FROM an earlier stage
	}
	ref, err := imageRef(st)
	if err != nil {
		return []error{err}
	}
	if _, ok := ref.(reference.Digested); ok {
		return nil
	}
	tagged, ok := ref.(reference.Tagged)
	switch {
	case !ok:
		return []error{fmt.Errorf("stage %s: base %s is not pinned: no tag (means latest)", st.Name, st.BaseName)}
	case tagged.Tag() == "latest":
		return []error{fmt.Errorf("stage %s: base %s is not pinned: latest", st.Name, st.BaseName)}
	case versionTag.MatchString(tagged.Tag()):
		return nil
	case strings.HasPrefix(ref.Name(), "gcr.io/distroless/") && distrolessRelease.MatchString(reference.Path(ref)):
		return nil
	}
	return []error{fmt.Errorf("stage %s: base %s is not pinned: tag %q carries no version", st.Name, st.BaseName, tagged.Tag())}
}

// checkNoSecrets: nothing secret-looking is baked in with ENV or ARG.
func checkNoSecrets(st instructions.Stage) []error {
	var errs []error
	for _, c := range st.Commands {
		switch c := c.(type) {
		case *instructions.EnvCommand:
			for _, kv := range c.Env {
				if secretEnv.MatchString(kv.Key) {
					errs = append(errs, fmt.Errorf("stage %s: ENV %s bakes a secret into the image", st.Name, kv.Key))
				}
			}
		case *instructions.ArgCommand:
			for _, a := range c.Args {
				if secretEnv.MatchString(a.Key) {
					errs = append(errs, fmt.Errorf("stage %s: ARG %s: build args end up in the image history; use a secret mount", st.Name, a.Key))
				}
			}
		}
	}
	return errs
}

// makeBuildCommand returns the `build` target's recipe with the Makefile's
// variables expanded (GO defaults to go), as `make build` runs it.
func makeBuildCommand(makefile []byte) (string, error) {
	vars := map[string]string{}
	var recipe []string
	inBuild := false
	for _, line := range strings.Split(string(makefile), "\n") {
		if strings.HasPrefix(line, "\t") {
			if inBuild {
				recipe = append(recipe, strings.TrimLeft(strings.TrimSpace(line), "@-+"))
			}
			continue
		}
		inBuild = false
		if strings.HasPrefix(line, "build:") {
			inBuild = true
			continue
		}
		if m := makeAssign.FindStringSubmatch(line); m != nil {
			if _, set := vars[m[1]]; m[2] == "?=" && set {
				continue
			}
			vars[m[1]] = m[3]
		}
	}
	if len(recipe) != 1 {
		return "", fmt.Errorf("Makefile: build target has %d recipe lines, want 1", len(recipe))
	}
	cmd := recipe[0]
	for range 10 {
		next := makeVarRef.ReplaceAllStringFunc(cmd, func(s string) string { return vars[s[2:len(s)-1]] })
		if next == cmd {
			break
		}
		cmd = next
	}
	if strings.Contains(cmd, "$(") {
		return "", fmt.Errorf("Makefile: build recipe %q does not expand", cmd)
	}
	return strings.ReplaceAll(cmd, "$$", "$"), nil
}

func normalizeSpace(s string) string { return strings.Join(strings.Fields(s), " ") }

// checkBuildStage: the build stage runs exactly the Makefile's build command.
// It returns where each built binary lands, by package base name.
func checkBuildStage(st *instructions.Stage, makeCmd string) (map[string]string, []error) {
	workdir := "/"
	found := false
	for _, c := range st.Commands {
		switch c := c.(type) {
		case *instructions.WorkdirCommand:
			workdir = path.Join(workdir, c.Path)
		case *instructions.RunCommand:
			got := normalizeSpace(strings.Join(c.CmdLine, " "))
			if got == normalizeSpace(makeCmd) || got == "make build" {
				found = true
			}
		}
	}
	if !found {
		return nil, []error{fmt.Errorf("stage %s: no RUN of the Makefile's build command %q (or `make build`)", st.Name, makeCmd)}
	}
	// `-o dir/ ./cmd/a ./cmd/b` writes dir/a and dir/b.
	fields := strings.Fields(makeCmd)
	outputs := map[string]string{}
	for i, f := range fields {
		if f == "-o" && i+1 < len(fields) {
			dir := fields[i+1]
			for _, pkg := range fields[i+2:] {
				if strings.HasPrefix(pkg, "./") {
					outputs[path.Base(pkg)] = path.Join(workdir, dir, path.Base(pkg))
				}
			}
		}
	}
	if outputs[workerBinary] == "" {
		return nil, []error{fmt.Errorf("Makefile: the build command %q does not build ./cmd/%s into an -o directory", makeCmd, workerBinary)}
	}
	return outputs, nil
}

// checkFinalStage: copies the worker built by the build stage, runs it as the
// entrypoint, as a numeric non-root user, and exposes 8080.
func checkFinalStage(st *instructions.Stage, outputs map[string]string) []error {
	var errs []error
	var user, entry string
	dest := map[string]string{} // copied binary -> path in the image
	exposed := false
	for _, c := range st.Commands {
		switch c := c.(type) {
		case *instructions.UserCommand:
			user = c.User
		case *instructions.CopyCommand:
			if c.From != buildStage {
				continue
			}
			for _, src := range c.SourcePaths {
				dest[src] = c.DestPath
			}
		case *instructions.EntrypointCommand:
			if c.PrependShell || len(c.CmdLine) == 0 {
				errs = append(errs, fmt.Errorf("stage %s: ENTRYPOINT must be exec form, so signals reach the worker", st.Name))
				continue
			}
			entry = c.CmdLine[0]
		case *instructions.ExposeCommand:
			for _, p := range c.Ports {
				exposed = exposed || p == strconv.Itoa(workerPort) || p == fmt.Sprintf("%d/tcp", workerPort)
			}
		}
	}
	if err := nonRootUser(user); err != nil {
		errs = append(errs, fmt.Errorf("stage %s: %w", st.Name, err))
	}
	worker, ok := dest[outputs[workerBinary]]
	if !ok {
		errs = append(errs, fmt.Errorf("stage %s: does not COPY --from=%s %s (where the Makefile's command writes the worker)", st.Name, buildStage, outputs[workerBinary]))
	} else if entry != worker {
		errs = append(errs, fmt.Errorf("stage %s: ENTRYPOINT %q is not the worker binary %s", st.Name, entry, worker))
	}
	if !exposed {
		errs = append(errs, fmt.Errorf("stage %s: no EXPOSE %d", st.Name, workerPort))
	}
	return errs
}

// nonRootUser: an explicit USER uid[:gid], numeric so that Kubernetes can
// check runAsNonRoot against the image, and not 0.
func nonRootUser(user string) error {
	if user == "" {
		return errors.New("no USER: the image runs as its base's user")
	}
	for _, part := range strings.Split(user, ":") {
		n, err := strconv.Atoi(part)
		if err != nil {
			return fmt.Errorf("USER %s is not numeric; Kubernetes cannot verify runAsNonRoot for a name", user)
		}
		if n == 0 {
			return fmt.Errorf("USER %s runs as root", user)
		}
	}
	return nil
}

// checkOllamaStage: the engine is started by the worker (SOUS_ENGINE_EXEC),
// and the image's Ollama is the version of the API client in go.mod.
func checkOllamaStage(st *instructions.Stage, in dockerInputs) []error {
	var errs []error
	env := map[string]string{}
	lex := shell.NewLex('\\')
	for _, c := range st.Commands {
		if e, ok := c.(*instructions.EnvCommand); ok {
			for _, kv := range e.Env {
				// ENV values are shell words: quotes are removed at build time.
				v, _, err := lex.ProcessWord(kv.Value, shell.EnvsFromSlice(nil))
				if err != nil {
					errs = append(errs, fmt.Errorf("stage %s: ENV %s: %w", st.Name, kv.Key, err))
				}
				env[kv.Key] = v
			}
		}
	}
	if env["SOUS_ENGINE_EXEC"] != "ollama serve" {
		errs = append(errs, fmt.Errorf("stage %s: SOUS_ENGINE_EXEC %q, want \"ollama serve\"", st.Name, env["SOUS_ENGINE_EXEC"]))
	}
	ref, err := imageRef(*st)
	if err != nil {
		return append(errs, err)
	}
	if reference.FamiliarName(ref) != "ollama/ollama" {
		return append(errs, fmt.Errorf("stage %s: base %s is not the official ollama/ollama image", st.Name, st.BaseName))
	}
	want, err := goModVersion(in.files["go.mod"], "github.com/ollama/ollama")
	if err != nil {
		return append(errs, err)
	}
	if tagged, ok := ref.(reference.Tagged); !ok || "v"+tagged.Tag() != want {
		errs = append(errs, fmt.Errorf("stage %s: base %s, want ollama/ollama:%s, the github.com/ollama/ollama version in go.mod", st.Name, st.BaseName, strings.TrimPrefix(want, "v")))
	}
	return errs
}

func goModVersion(gomod []byte, module string) (string, error) {
	f, err := modfile.Parse("go.mod", gomod, nil)
	if err != nil {
		return "", err
	}
	for _, r := range f.Require {
		if r.Mod.Path == module {
			return r.Mod.Version, nil
		}
	}
	return "", fmt.Errorf("go.mod does not require %s", module)
}

// checkGoVersion: the build image's Go is at least go.mod's go directive
// (GOTOOLCHAIN=local would otherwise refuse to build).
func checkGoVersion(st *instructions.Stage, gomod []byte) []error {
	f, err := modfile.Parse("go.mod", gomod, nil)
	if err != nil {
		return []error{err}
	}
	ref, err := imageRef(*st)
	if err != nil {
		return []error{err}
	}
	tagged, ok := ref.(reference.Tagged)
	if reference.FamiliarName(ref) != "golang" || !ok {
		return []error{fmt.Errorf("stage %s: base %s is not a tagged official golang image", st.Name, st.BaseName)}
	}
	v := versionTag.FindString(tagged.Tag())
	if version.Compare("go"+v, "go"+f.Go.Version) < 0 {
		return []error{fmt.Errorf("stage %s: Go %s is older than go.mod's go %s", st.Name, v, f.Go.Version)}
	}
	return nil
}

// glibcOf is the glibc of the base images sous uses (Debian and Ubuntu
// release notes). A cgo binary needs its build image's glibc or newer at run
// time: built on bookworm it references GLIBC_2.34 symbols.
var glibcOf = []struct {
	match *regexp.Regexp // against the familiar image reference
	glibc string
}{
	{regexp.MustCompile(`^golang:.*-bookworm$`), "2.36"},
	{regexp.MustCompile(`^golang:.*-trixie$`), "2.41"},
	{regexp.MustCompile(`^gcr\.io/distroless/[a-z-]+-debian12(:|@)`), "2.36"},
	{regexp.MustCompile(`^gcr\.io/distroless/[a-z-]+-debian13(:|@)`), "2.41"},
	{regexp.MustCompile(`^ubuntu:20\.04$`), "2.31"},
	{regexp.MustCompile(`^ubuntu:22\.04$`), "2.35"},
	{regexp.MustCompile(`^ubuntu:24\.04$`), "2.39"},
}

// glibc returns the glibc of an image; for ollama/ollama it reads the base of
// that release's own Dockerfile from the Go module of the same version.
func glibc(ref reference.Named, in dockerInputs, depth int) (string, error) {
	fam := reference.FamiliarString(ref)
	for _, g := range glibcOf {
		if g.match.MatchString(fam) {
			return g.glibc, nil
		}
	}
	tagged, ok := ref.(reference.Tagged)
	if reference.FamiliarName(ref) != "ollama/ollama" || !ok || depth > 0 {
		return "", fmt.Errorf("glibc of %s unknown; add it to glibcOf", fam)
	}
	dir, err := in.moduleDir("github.com/ollama/ollama", "v"+tagged.Tag())
	if err != nil {
		return "", err
	}
	b, err := os.ReadFile(filepath.Join(dir, "Dockerfile"))
	if err != nil {
		return "", err
	}
	stages, _ := dockerfileStages(b)
	if len(stages) == 0 {
		return "", fmt.Errorf("ollama %s: Dockerfile has no stages", tagged.Tag())
	}
	last := stages[len(stages)-1]
	base, err := reference.ParseNormalizedNamed(last.BaseName)
	if err != nil {
		return "", fmt.Errorf("ollama %s: final base %q: %w", tagged.Tag(), last.BaseName, err)
	}
	return glibc(base, in, depth+1)
}

// checkGlibc: each final image has at least the glibc the build stage links against.
func checkGlibc(stages map[string]*instructions.Stage, in dockerInputs) []error {
	bref, err := imageRef(*stages[buildStage])
	if err != nil {
		return []error{err}
	}
	need, err := glibc(bref, in, 0)
	if err != nil {
		return []error{err}
	}
	var errs []error
	for _, name := range finalStages {
		ref, err := imageRef(*stages[name])
		if err != nil {
			errs = append(errs, err)
			continue
		}
		have, err := glibc(ref, in, 0)
		if err != nil {
			errs = append(errs, fmt.Errorf("stage %s: %w", name, err))
			continue
		}
		if version.Compare("go1."+have, "go1."+need) < 0 { // x.y compared as Go versions 1.x.y
			errs = append(errs, fmt.Errorf("stage %s: base %s has glibc %s, the worker built on %s needs %s", name, stages[name].BaseName, have, stages[buildStage].BaseName, need))
		}
	}
	return errs
}

// checkDockerignore: the build context leaves out the repository's history,
// caches, build outputs and secrets, and keeps what the build needs. Matching
// uses BuildKit's own .dockerignore rules.
func checkDockerignore(b []byte) []error {
	patterns, err := ignorefile.ReadAll(bytes.NewReader(b))
	if err != nil {
		return []error{fmt.Errorf(".dockerignore: %w", err)}
	}
	pm, err := patternmatcher.New(patterns)
	if err != nil {
		return []error{fmt.Errorf(".dockerignore: %w", err)}
	}
	var errs []error
	for _, p := range []string{".git/HEAD", ".cache/bin/ollama", "bin/worker", ".env", "deploy/k8s/overlays/rabbitmq/secret.example.yaml", "certs/tls.key"} {
		if ok, _ := pm.MatchesOrParentMatches(p); !ok {
			errs = append(errs, fmt.Errorf(".dockerignore does not exclude %s", p))
		}
	}
	for _, p := range []string{"go.mod", "go.sum", "cmd/worker/main.go", "cmd/sousctl/main.go", "internal/queue/queue.go"} {
		if ok, _ := pm.MatchesOrParentMatches(p); ok {
			errs = append(errs, fmt.Errorf(".dockerignore excludes %s, which the build needs", p))
		}
	}
	return errs
}

// modDirs caches module directories by "path@version"; versions are immutable.
var modDirs sync.Map

// goModuleDir runs `go mod download` (offline when the module cache has the
// version, as for every version go.mod names) and returns the module's
// source directory.
func goModuleDir(t *testing.T) func(path, version string) (string, error) {
	root := repoRoot(t)
	return func(mod, ver string) (string, error) {
		key := mod + "@" + ver
		if d, ok := modDirs.Load(key); ok {
			return d.(string), nil
		}
		cmd := exec.Command("go", "mod", "download", "-json", key)
		cmd.Dir = root
		out, err := cmd.Output()
		if err != nil {
			return "", fmt.Errorf("go mod download %s: %w", key, err)
		}
		var info struct{ Dir, Error string }
		if err := json.Unmarshal(out, &info); err != nil {
			return "", err
		}
		if info.Error != "" || info.Dir == "" {
			return "", fmt.Errorf("go mod download %s: %s", key, info.Error)
		}
		modDirs.Store(key, info.Dir)
		return info.Dir, nil
	}
}

func dockerSetup(t *testing.T) dockerInputs {
	t.Helper()
	return dockerInputs{
		files:     loadTree(t, nil, "Dockerfile", ".dockerignore", "Makefile", "go.mod"),
		moduleDir: goModuleDir(t),
	}
}

func TestDockerfile(t *testing.T) {
	t.Parallel()
	in := dockerSetup(t)
	if errs := checkDockerfile(in); len(errs) > 0 {
		t.Fatalf("%d problems:\n%v", len(errs), errors.Join(errs...))
	}
}

func TestMakeBuildCommand(t *testing.T) {
	t.Parallel()
	got, err := makeBuildCommand([]byte("GO ?= go\nGO_BUILD = CGO_ENABLED=1 $(GO) build -o bin/\n\n.PHONY: build\nbuild:\n\t@$(GO_BUILD) ./cmd/worker\n\nother:\n\techo $$HOME\n"))
	if err != nil {
		t.Fatal(err)
	}
	if want := "CGO_ENABLED=1 go build -o bin/ ./cmd/worker"; got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
}

// TestDockerfileChecksCatchBrokenCopies breaks one thing at a time in copies
// of the Dockerfile, .dockerignore, Makefile and go.mod.
func TestDockerfileChecksCatchBrokenCopies(t *testing.T) {
	t.Parallel()
	good := dockerSetup(t)
	const df = "Dockerfile"
	tests := []struct {
		name string
		m    mutation
		want string
	}{
		{"stage missing", mutation{df, "AS worker-ollama", "AS ollama"}, `no stage named "worker-ollama"`},
		{"latest", mutation{df, "GO_IMAGE=golang:1.26.8-bookworm", "GO_IMAGE=golang:latest"}, "is not pinned: latest"},
		{"no tag", mutation{df, "OLLAMA_IMAGE=ollama/ollama:0.17.4", "OLLAMA_IMAGE=ollama/ollama"}, "is not pinned: no tag"},
		{"tag without a version", mutation{df, "GO_IMAGE=golang:1.26.8-bookworm", "GO_IMAGE=golang:bookworm"}, `tag "bookworm" carries no version`},
		{"distroless without a release", mutation{df, "gcr.io/distroless/base-debian12:nonroot", "gcr.io/distroless/base:nonroot"}, `tag "nonroot" carries no version`},
		{"digest pins", mutation{df, "gcr.io/distroless/base-debian12:nonroot", "gcr.io/distroless/base-debian12@sha256:" + strings.Repeat("a", 64)}, ""},
		{"base ARG without a default", mutation{df, "ARG GO_IMAGE=golang:1.26.8-bookworm", "ARG GO_IMAGE"}, "uses ARG GO_IMAGE, which has no default"},
		{"literal base is fine", mutation{df, "FROM ${GO_IMAGE} AS build", "FROM golang:1.26.8-bookworm AS build"}, ""},
		{"worker as root", mutation{df, "USER 65532:65532\nEXPOSE 8080\nENTRYPOINT [\"/usr/local/bin/sous-worker\"]\n\n", "USER 0\nEXPOSE 8080\nENTRYPOINT [\"/usr/local/bin/sous-worker\"]\n\n"}, "stage worker: USER 0 runs as root"},
		{"named user", mutation{df, "USER 65532:65532\nEXPOSE 8080\nENTRYPOINT [\"/usr/local/bin/sous-worker\"]\n\n", "USER nonroot\nEXPOSE 8080\nENTRYPOINT [\"/usr/local/bin/sous-worker\"]\n\n"}, "USER nonroot is not numeric"},
		{"ollama stage keeps root", mutation{df, "/models /home/sous\nUSER 65532:65532\n", "/models /home/sous\n"}, "stage worker-ollama: no USER"},
		{"root group", mutation{df, "/models /home/sous\nUSER 65532:65532\n", "/models /home/sous\nUSER 65532:0\n"}, "USER 65532:0 runs as root"},
		{"build flags drift", mutation{df, `go build -trimpath -ldflags="-s -w"`, `go build -ldflags="-s -w"`}, "no RUN of the Makefile's build command"},
		{"cgo off", mutation{df, "CGO_ENABLED=1 go build", "CGO_ENABLED=0 go build"}, "no RUN of the Makefile's build command"},
		{"make build is fine", mutation{df, `CGO_ENABLED=1 go build -trimpath -ldflags="-s -w" -o bin/ ./cmd/worker ./cmd/sousctl`, "make build"}, ""},
		{"Makefile changes alone", mutation{"Makefile", `-trimpath -ldflags="-s -w"`, `-trimpath -ldflags="-s -w -X main.version=dev"`}, `no RUN of the Makefile's build command "CGO_ENABLED=1 go build -trimpath -ldflags=\"-s -w -X main.version=dev\"`},
		{"copies the wrong path", mutation{df, "AS worker\nCOPY --from=build /src/bin/worker ", "AS worker\nCOPY --from=build /src/worker "}, "stage worker: does not COPY --from=build /src/bin/worker"},
		{"entrypoint not the worker", mutation{df, "ENTRYPOINT [\"/usr/local/bin/sous-worker\"]\n# The base", "ENTRYPOINT [\"/bin/ollama\"]\n# The base"}, `stage worker-ollama: ENTRYPOINT "/bin/ollama" is not the worker binary`},
		{"shell-form entrypoint", mutation{df, "ENTRYPOINT [\"/usr/local/bin/sous-worker\"]\n# The base", "ENTRYPOINT /usr/local/bin/sous-worker\n# The base"}, "ENTRYPOINT must be exec form"},
		{"no EXPOSE", mutation{df, "EXPOSE 8080\nENTRYPOINT [\"/usr/local/bin/sous-worker\"]\n\n", "ENTRYPOINT [\"/usr/local/bin/sous-worker\"]\n\n"}, "stage worker: no EXPOSE 8080"},
		{"engine not supervised", mutation{df, `SOUS_ENGINE_EXEC="ollama serve"`, `SOUS_ENGINE_EXEC=""`}, `SOUS_ENGINE_EXEC "", want "ollama serve"`},
		{"HEALTHCHECK", mutation{df, "CMD []\n", "CMD []\nHEALTHCHECK CMD [\"/usr/local/bin/sousctl\", \"health\"]\n"}, "HEALTHCHECK is ignored by Kubernetes"},
		{"secret baked in", mutation{df, "ENV GOTOOLCHAIN=local\n", "ENV GOTOOLCHAIN=local\nENV SOUS_AMQP_URL=amqp://sous:pw@rabbitmq:5672/\n"}, "ENV SOUS_AMQP_URL bakes a secret"},
		{"secret build arg", mutation{df, "ENV GOTOOLCHAIN=local\n", "ENV GOTOOLCHAIN=local\nARG GITHUB_TOKEN\n"}, "ARG GITHUB_TOKEN"},
		{"BuildKit lint", mutation{df, "FROM ${GO_IMAGE} AS build", "FROM ${GO_IMAGE} as build"}, "lint FromAsCasing"},
		{"Go older than go.mod", mutation{df, "GO_IMAGE=golang:1.26.8-bookworm", "GO_IMAGE=golang:1.26.1-bookworm"}, "Go 1.26.1 is older than go.mod's go 1.26.8"},
		{"glibc newer than the runtime", mutation{df, "GO_IMAGE=golang:1.26.8-bookworm", "GO_IMAGE=golang:1.26.8-trixie"}, "stage worker: base gcr.io/distroless/base-debian12:nonroot has glibc 2.36, the worker built on golang:1.26.8-trixie needs 2.41"},
		{"old Ollama image", mutation{df, "OLLAMA_IMAGE=ollama/ollama:0.17.4", "OLLAMA_IMAGE=ollama/ollama:0.6.5"}, "stage worker-ollama: base ollama/ollama:0.6.5 has glibc 2.31"},
		{"Ollama not the go.mod version", mutation{"go.mod", "github.com/ollama/ollama v0.17.4", "github.com/ollama/ollama v0.17.5"}, "want ollama/ollama:0.17.5"},
		{"not the official Ollama", mutation{df, "OLLAMA_IMAGE=ollama/ollama:0.17.4", "OLLAMA_IMAGE=example.com/ollama:0.17.4"}, "not the official ollama/ollama image"},
		{".git in context", mutation{".dockerignore", "\n.git\n", "\n"}, ".dockerignore does not exclude .git/HEAD"},
		{".cache in context", mutation{".dockerignore", "\n.cache\n", "\n"}, ".dockerignore does not exclude .cache/bin/ollama"},
		{"bin in context", mutation{".dockerignore", "\nbin\n", "\n"}, ".dockerignore does not exclude bin/worker"},
		{"keys in context", mutation{".dockerignore", "**/*.key\n", ""}, ".dockerignore does not exclude certs/tls.key"},
		{"sources excluded", mutation{".dockerignore", "\ndeploy\n", "\ndeploy\ninternal\n"}, ".dockerignore excludes internal/queue/queue.go, which the build needs"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			in := good
			in.files = tt.m.apply(t, good.files)
			requireErr(t, checkDockerfile(in), tt.want)
		})
	}
}
