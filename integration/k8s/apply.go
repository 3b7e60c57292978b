package k8s

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	apimeta "k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
)

// FieldManager is the server-side apply manager of everything the tests
// apply.
const FieldManager = "sous-test"

// Decode splits a multi-document YAML stream into objects.
func Decode(manifests []byte) ([]*unstructured.Unstructured, error) { return decodeYAML(manifests) }

// Apply server-side applies each object of a multi-document YAML stream,
// in order, forcing conflicts (the tests own these objects). An object
// whose kind the apiserver does not serve yet (a CRD just applied) is
// retried with fresh discovery for up to 30 s.
func (c *ControlPlane) Apply(ctx context.Context, manifests []byte) ([]*unstructured.Unstructured, error) {
	objs, err := decodeYAML(manifests)
	if err != nil {
		return nil, err
	}
	return objs, c.ApplyObjects(ctx, objs)
}

// ApplyObjects server-side applies objs in order, as Apply does.
func (c *ControlPlane) ApplyObjects(ctx context.Context, objs []*unstructured.Unstructured) error {
	for _, o := range objs {
		if err := c.applyOne(ctx, o); err != nil {
			return fmt.Errorf("apply %s %s/%s: %w", o.GetKind(), o.GetNamespace(), o.GetName(), err)
		}
	}
	return nil
}

func (c *ControlPlane) applyOne(ctx context.Context, o *unstructured.Unstructured) error {
	gvk := o.GroupVersionKind()
	deadline := time.Now().Add(30 * time.Second)
	var mapping *apimeta.RESTMapping
	for {
		var err error
		mapping, err = c.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err == nil {
			break
		}
		if !apimeta.IsNoMatchError(err) || time.Now().After(deadline) {
			return err
		}
		c.mapper.Reset()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(300 * time.Millisecond):
		}
	}
	var ri = c.Dynamic.Resource(mapping.Resource)
	opts := metav1.ApplyOptions{FieldManager: FieldManager, Force: true}
	if mapping.Scope.Name() == apimeta.RESTScopeNameNamespace {
		_, err := ri.Namespace(o.GetNamespace()).Apply(ctx, o.GetName(), o, opts)
		return err
	}
	_, err := ri.Apply(ctx, o.GetName(), o, opts)
	return err
}

// ApplyDir applies every .yaml file of dir, in name order.
func (c *ControlPlane) ApplyDir(ctx context.Context, dir string) error {
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil {
		return err
	}
	if len(files) == 0 {
		return fmt.Errorf("no .yaml files in %s", dir)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return err
		}
		if _, err := c.Apply(ctx, b); err != nil {
			return fmt.Errorf("%s: %w", filepath.Base(f), err)
		}
	}
	return nil
}

// WaitServed waits until the apiserver serves gvr (a CRD's resource is
// served a moment after the CRD is accepted).
func (c *ControlPlane) WaitServed(ctx context.Context, gvr schema.GroupVersionResource) error {
	for {
		c.mapper.Reset()
		if _, err := c.mapper.KindFor(gvr); err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s is not served: %w", gvr, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func decodeYAML(b []byte) ([]*unstructured.Unstructured, error) {
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(b), 4096)
	var out []*unstructured.Unstructured
	for {
		var m map[string]any
		if err := dec.Decode(&m); err != nil {
			if errors.Is(err, io.EOF) {
				return out, nil
			}
			return nil, err
		}
		if len(m) == 0 {
			continue
		}
		out = append(out, &unstructured.Unstructured{Object: m})
	}
}

// kustomizeMu: kustomize keeps its OpenAPI schema in package state without
// a lock (kyaml/openapi), so two builds at once race (deploy/ does the
// same).
var kustomizeMu sync.Mutex

// Kustomize renders dir (slash-separated, relative to the repo root) the
// way `kustomize build` does, in memory: the repo's deploy/ tree plus the
// extra files given (path relative to the repo root → content), so that a
// test can add an overlay of its own on top of the project's.
func Kustomize(dir string, extra map[string]string) ([]byte, error) {
	root, err := RepoRoot()
	if err != nil {
		return nil, err
	}
	mem := filesys.MakeFsInMemory()
	err = filepath.WalkDir(filepath.Join(root, "deploy"), func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(path, ".yaml") {
			return err
		}
		rel, err := filepath.Rel(root, path)
		if err != nil {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		return mem.WriteFile("/"+filepath.ToSlash(rel), b)
	})
	if err != nil {
		return nil, err
	}
	for p, s := range extra {
		if err := mem.WriteFile("/"+p, []byte(s)); err != nil {
			return nil, err
		}
	}
	kustomizeMu.Lock()
	defer kustomizeMu.Unlock()
	res, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(mem, "/"+dir)
	if err != nil {
		return nil, fmt.Errorf("kustomize build %s: %w", dir, err)
	}
	return res.AsYaml()
}
