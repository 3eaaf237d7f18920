// Command kstatus prints the kstatus verdict (sigs.k8s.io/cli-utils/pkg/kstatus) of every
// object it reads: what Flux, Argo CD-style health checks and `kubectl wait`-like tooling see.
//
//	kubectl get outboundconnectors -o json | kstatus
//
// Input: one object, or a List (kind: List / *List with items), as JSON on stdin.
// Output: one JSON object per input object, one per line:
// {"kind":..., "namespace":..., "name":..., "status":"Current|InProgress|Failed|...", "message":...}
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type verdict struct {
	Kind      string `json:"kind"`
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	Status    string `json:"status"`
	Message   string `json:"message"`
}

func main() {
	raw, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail(err)
	}
	// The unstructured JSON scheme keeps integers int64 (metadata.generation), as clients do.
	decoded, _, err := unstructured.UnstructuredJSONScheme.Decode(raw, nil, nil)
	if err != nil {
		fail(err)
	}
	var objects []unstructured.Unstructured
	switch o := decoded.(type) {
	case *unstructured.UnstructuredList:
		objects = o.Items
	case *unstructured.Unstructured:
		objects = []unstructured.Unstructured{*o}
	default:
		fail(fmt.Errorf("unexpected input %T", decoded))
	}
	out := json.NewEncoder(os.Stdout)
	for i := range objects {
		u := &objects[i]
		result, err := status.Compute(u)
		if err != nil {
			fail(fmt.Errorf("%s/%s: %w", u.GetKind(), u.GetName(), err))
		}
		if err := out.Encode(verdict{u.GetKind(), u.GetNamespace(), u.GetName(), result.Status.String(), result.Message}); err != nil {
			fail(err)
		}
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "kstatus:", err)
	os.Exit(1)
}
