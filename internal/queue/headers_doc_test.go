package queue_test

import (
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// Every x-sous-* header the code names is a row of docs/messages.md's
// header table, and every row is a header the code names: x-sous-publish-id
// was once on every message RabbitMQ carried and in no doc.
func TestEveryHeaderIsDocumented(t *testing.T) {
	t.Parallel()
	root := filepath.Join("..", "..")
	header := regexp.MustCompile(`"(x-sous-[a-z0-9-]*[a-z0-9])"`)
	inCode := map[string]string{}
	for _, dir := range []string{"cmd", "internal"} {
		err := filepath.WalkDir(filepath.Join(root, dir), func(path string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
				return err
			}
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			for _, m := range header.FindAllStringSubmatch(string(b), -1) {
				inCode[m[1]] = path
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	doc, err := os.ReadFile(filepath.Join(root, "docs", "messages.md"))
	if err != nil {
		t.Fatal(err)
	}
	var rows []string
	for _, m := range regexp.MustCompile("(?m)^\\| `(x-sous-[a-z0-9-]+)` \\|").FindAllStringSubmatch(string(doc), -1) {
		rows = append(rows, m[1])
	}
	if len(inCode) < 5 {
		t.Fatalf("found only %v in the code", inCode)
	}
	for h, where := range inCode {
		if !slices.Contains(rows, h) {
			t.Errorf("%s (%s) is not in docs/messages.md's table of x-sous-* headers", h, where)
		}
	}
	for _, h := range rows {
		if _, ok := inCode[h]; !ok {
			t.Errorf("docs/messages.md documents %s, which no code sets or reads", h)
		}
	}
}
