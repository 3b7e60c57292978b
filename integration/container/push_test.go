package container

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sous-run/sous/integration/containertest"
)

// Media types a registry may answer for an image index and an image.
const (
	mediaDockerList     = "application/vnd.docker.distribution.manifest.list.v2+json"
	mediaOCIIndex       = "application/vnd.oci.image.index.v1+json"
	mediaDockerManifest = "application/vnd.docker.distribution.manifest.v2+json"
	mediaOCIManifest    = "application/vnd.oci.image.manifest.v1+json"
)

// pushedImages: what `make push` pushes and the entrypoint each runs.
var pushedImages = map[string]string{
	"sous-worker":        "/usr/local/bin/sous-worker",
	"sous-worker-ollama": "/usr/local/bin/sous-worker",
	"sous-gateway":       "/usr/local/bin/sous-gateway",
	"sous-scaler":        "/usr/local/bin/sous-scaler",
}

// TestMakePush runs `make push` (the stand-in builds of this machine's
// platform) against a real OCI registry on loopback, the CNCF distribution
// registry built from its Go module, then reads every printed digest back:
// from the registry's API (an image index whose digest is the one printed,
// with this machine's platform, the image's config and entrypoint) and with
// `docker pull REGISTRY/NAME@sha256:...`.
func TestMakePush(t *testing.T) {
	containertest.Require(t)
	root := repoRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Minute)
	defer cancel()

	reg := startRegistry(t, ctx, root)
	cmd := exec.CommandContext(ctx, "make", "-s", "push", "REGISTRY="+reg, "BASES=standin")
	cmd.Dir = root
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	tag := manifestsTag(t, root)
	arch := map[string]string{"x86_64": "amd64", "aarch64": "arm64"}[unameM(t)]
	// make push leaves its per-platform tags in the engine; a registry on a
	// port that is gone names nothing anyone can use.
	t.Cleanup(func() {
		for name := range pushedImages {
			_ = exec.Command("docker", "image", "rm", reg+"/"+name+":"+tag+"-"+arch).Run()
		}
	})
	if err := cmd.Run(); err != nil {
		t.Fatalf("make push: %v\nstdout:\n%s\nstderr:\n%s", err, stdout.String(), stderr.String())
	}
	t.Logf("make push took %s; it printed:\n%s", time.Since(start).Round(time.Second), stdout.String())

	line := regexp.MustCompile(`^` + regexp.QuoteMeta(reg) + `/([a-z-]+)@(sha256:[0-9a-f]{64})$`)
	got := map[string]string{}
	for _, l := range strings.Split(strings.TrimSpace(stdout.String()), "\n") {
		m := line.FindStringSubmatch(l)
		if m == nil {
			t.Fatalf("make push printed %q on stdout, want only lines %s/NAME@sha256:...", l, reg)
		}
		got[m[1]] = m[2]
	}
	if len(got) != len(pushedImages) {
		t.Fatalf("make push printed digests for %v, want %d images: %v", slices.Sorted(maps.Keys(got)), len(pushedImages), slices.Sorted(maps.Keys(pushedImages)))
	}
	for name, entry := range pushedImages {
		digest, ok := got[name]
		if !ok {
			t.Errorf("no digest printed for %s", name)
			continue
		}
		t.Run(name, func(t *testing.T) {
			checkPushed(t, ctx, reg, name, digest, tag, arch, entry)
		})
	}
}

// checkPushed reads NAME@DIGEST back from the registry and through docker.
func checkPushed(t *testing.T, ctx context.Context, reg, name, digest, tag, arch, entry string) {
	base := "http://" + reg + "/v2/" + name
	// The tag the manifests use names the same index.
	body, typ, dcd := registryGet(t, ctx, base+"/manifests/"+tag, mediaDockerList, mediaOCIIndex)
	if dcd != digest {
		t.Errorf("%s:%s is %s, make push printed %s", name, tag, dcd, digest)
	}
	body, typ, dcd = registryGet(t, ctx, base+"/manifests/"+digest, mediaDockerList, mediaOCIIndex)
	if sum := sha256.Sum256(body); "sha256:"+hex.EncodeToString(sum[:]) != digest || dcd != digest {
		t.Errorf("%s@%s: the registry's manifest hashes to %x (Docker-Content-Digest %s)", name, digest, sum, dcd)
	}
	if typ != mediaDockerList && typ != mediaOCIIndex {
		t.Fatalf("%s@%s is a %s, want an image index", name, digest, typ)
	}
	var index struct {
		Manifests []struct {
			MediaType string `json:"mediaType"`
			Digest    string `json:"digest"`
			Platform  struct {
				OS           string `json:"os"`
				Architecture string `json:"architecture"`
			} `json:"platform"`
		} `json:"manifests"`
	}
	if err := json.Unmarshal(body, &index); err != nil {
		t.Fatalf("%s@%s: %v", name, digest, err)
	}
	var platforms []string
	for _, m := range index.Manifests {
		platforms = append(platforms, m.Platform.OS+"/"+m.Platform.Architecture)
	}
	if want := []string{"linux/" + arch}; !slices.Equal(platforms, want) {
		t.Fatalf("%s@%s: platforms %v, want %v", name, digest, platforms, want)
	}
	mbody, mtyp, _ := registryGet(t, ctx, base+"/manifests/"+index.Manifests[0].Digest, mediaDockerManifest, mediaOCIManifest)
	if mtyp != mediaDockerManifest && mtyp != mediaOCIManifest {
		t.Fatalf("%s's %s image is a %s", name, arch, mtyp)
	}
	var manifest struct {
		Config struct {
			Digest string `json:"digest"`
		} `json:"config"`
		Layers []json.RawMessage `json:"layers"`
	}
	if err := json.Unmarshal(mbody, &manifest); err != nil {
		t.Fatal(err)
	}
	cbody, _, _ := registryGet(t, ctx, base+"/blobs/"+manifest.Config.Digest)
	var config struct {
		OS           string `json:"os"`
		Architecture string `json:"architecture"`
		Config       struct {
			User       string   `json:"User"`
			Entrypoint []string `json:"Entrypoint"`
		} `json:"config"`
	}
	if err := json.Unmarshal(cbody, &config); err != nil {
		t.Fatal(err)
	}
	if config.OS != "linux" || config.Architecture != arch || len(manifest.Layers) == 0 {
		t.Errorf("%s: config says %s/%s, %d layers", name, config.OS, config.Architecture, len(manifest.Layers))
	}
	if !slices.Equal(config.Config.Entrypoint, []string{entry}) || config.Config.User != "65532:65532" {
		t.Errorf("%s: entrypoint %v user %q, want [%s] 65532:65532", name, config.Config.Entrypoint, config.Config.User, entry)
	}

	// As a cluster would: pull by digest.
	ref := reg + "/" + name + "@" + digest
	out, err := exec.CommandContext(ctx, "docker", "pull", ref).CombinedOutput()
	if err != nil {
		t.Fatalf("docker pull %s: %v\n%s", ref, err, out)
	}
	t.Cleanup(func() { exec.Command("docker", "image", "rm", ref).Run() })
	out, err = exec.CommandContext(ctx, "docker", "image", "inspect", "--format", "{{json .RepoDigests}} {{json .Config.Entrypoint}}", ref).CombinedOutput()
	if err != nil {
		t.Fatalf("docker image inspect %s: %v\n%s", ref, err, out)
	}
	if !strings.Contains(string(out), `"`+ref+`"`) || !strings.Contains(string(out), `["`+entry+`"]`) {
		t.Errorf("docker image inspect %s: %s", ref, out)
	}
}

// registryGet GETs url from the registry, accepting the given media types,
// and returns the body, its Content-Type and Docker-Content-Digest.
func registryGet(t *testing.T, ctx context.Context, url string, accept ...string) (body []byte, mediaType, digest string) {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(accept) > 0 {
		req.Header.Set("Accept", strings.Join(accept, ", "))
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, err = io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s %v\n%s", url, resp.Status, err, body)
	}
	return body, resp.Header.Get("Content-Type"), resp.Header.Get("Docker-Content-Digest")
}

// startRegistry builds the registry (scripts/build-tools.sh) and runs it on
// a free loopback port with its storage in a temporary directory until the
// test ends; it returns 127.0.0.1:PORT once /v2/ answers.
func startRegistry(t *testing.T, ctx context.Context, root string) string {
	t.Helper()
	out, err := exec.CommandContext(ctx, filepath.Join(root, "scripts", "build-tools.sh"), "registry").Output()
	if err != nil {
		t.Fatalf("scripts/build-tools.sh registry: %v", err)
	}
	bin := strings.TrimSpace(string(out))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	dir := t.TempDir()
	config := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(config, []byte(fmt.Sprintf(`version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
`, filepath.Join(dir, "data"), addr)), 0o644); err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	cmd := exec.Command(bin, "serve", config)
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
		if t.Failed() {
			t.Logf("registry log:\n%s", logs.String())
		}
	})
	deadline := time.Now().Add(time.Minute)
	for {
		resp, err := http.Get("http://" + addr + "/v2/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return addr
			}
		}
		select {
		case <-done:
			t.Fatalf("the registry exited:\n%s", logs.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("the registry at %s did not answer /v2/ within a minute: %v\n%s", addr, err, logs.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// manifestsTag is the tag deploy/k8s/images gives the images: make push's
// default TAG.
func manifestsTag(t *testing.T, root string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, "deploy", "k8s", "images", "kustomization.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^\s*newTag:\s*(\S+)`).FindSubmatch(b)
	if m == nil {
		t.Fatal("deploy/k8s/images/kustomization.yaml has no newTag")
	}
	return string(m[1])
}

func unameM(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("uname", "-m").Output()
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(out))
}

func repoRoot(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Dir(strings.TrimSpace(string(out)))
}
