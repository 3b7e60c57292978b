package k8s

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// Binaries are the paths of the control plane's programs and of KEDA's
// CRDs, as scripts/build-k8s.sh leaves them.
type Binaries struct {
	Etcd, APIServer, ControllerManager, KEDA string
	// KEDAAdapter is KEDA's metrics apiserver (external.metrics.k8s.io).
	KEDAAdapter string
	// KEDACRDs is the directory of KEDA's CRD manifests, from the same
	// module version as the operator.
	KEDACRDs string
	// Helm is the helm CLI (tools/helm), for the chart under deploy/helm.
	Helm string
}

// RepoRoot is the directory of the project's go.mod, found upwards from
// the working directory.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && len(b) > 0 && modulePath(b) == "github.com/sous-run/sous" {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod of github.com/sous-run/sous above the working directory")
		}
		dir = parent
	}
}

func modulePath(gomod []byte) string {
	var m string
	if _, err := fmt.Sscanf(string(gomod), "module %s", &m); err != nil {
		return ""
	}
	return m
}

// What a test needs built, each level including the ones before it.
type level int

const (
	controlPlane level = iota // etcd, kube-apiserver, kube-controller-manager
	kedaOperator              // + the KEDA operator and its CRDs
	kedaAdapter               // + KEDA's metrics apiserver
	helmCLI                   // + helm
)

// findBinaries returns the built control plane (and, from kedaOperator on,
// KEDA), or an error naming what is missing and how to build it.
func findBinaries(l level) (Binaries, error) {
	root, err := RepoRoot()
	if err != nil {
		return Binaries{}, err
	}
	cache := filepath.Join(root, ".cache", "k8s")
	b := Binaries{
		Etcd:              filepath.Join(cache, "bin", "etcd"),
		APIServer:         filepath.Join(cache, "bin", "kube-apiserver"),
		ControllerManager: filepath.Join(cache, "bin", "kube-controller-manager"),
		KEDA:              filepath.Join(cache, "bin", "keda-operator"),
		KEDAAdapter:       filepath.Join(cache, "bin", "keda-adapter"),
		KEDACRDs:          filepath.Join(cache, "keda-crds"),
		Helm:              filepath.Join(cache, "bin", "helm"),
	}
	need := []string{b.Etcd, b.APIServer, b.ControllerManager}
	if l >= kedaOperator {
		need = append(need, b.KEDA, filepath.Join(b.KEDACRDs, "keda.sh_scaledobjects.yaml"))
	}
	if l >= kedaAdapter {
		need = append(need, b.KEDAAdapter)
	}
	if l >= helmCLI {
		need = append(need, b.Helm)
	}
	for _, p := range need {
		if _, err := os.Stat(p); err != nil {
			return b, fmt.Errorf("%s is missing: run `make k8s` (builds the control plane and KEDA from their Go modules, about 17 minutes cold on 2 idle cores)", p)
		}
	}
	return b, nil
}

// NeedControlPlane returns the built control plane. When it is missing the
// test is skipped with one line, or fails when CI=true (CI runs `make
// test`, which builds it: a missing binary there is a broken build, not a
// reason to skip).
func NeedControlPlane(t testing.TB) Binaries { t.Helper(); return need(t, controlPlane) }

// NeedKEDA is NeedControlPlane plus the KEDA operator and its CRDs.
func NeedKEDA(t testing.TB) Binaries { t.Helper(); return need(t, kedaOperator) }

// NeedKEDAAdapter is NeedKEDA plus KEDA's metrics apiserver.
func NeedKEDAAdapter(t testing.TB) Binaries { t.Helper(); return need(t, kedaAdapter) }

// NeedHelm is NeedKEDAAdapter plus helm.
func NeedHelm(t testing.TB) Binaries { t.Helper(); return need(t, helmCLI) }

func need(t testing.TB, l level) Binaries {
	t.Helper()
	b, err := findBinaries(l)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("k8s: %v", err)
		}
		t.Skipf("k8s: %v", err)
	}
	return b
}
