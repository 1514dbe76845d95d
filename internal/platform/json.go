package platform

import (
	"database/sql/driver"
	"encoding/json"
	"fmt"
)

// JSONObject is a JSON object stored in a jsonb column.
type JSONObject map[string]any

// Scan reads a jsonb value; NULL is an empty object.
func (o *JSONObject) Scan(src any) error {
	data, err := jsonBytes(src)
	if err != nil || data == nil {
		*o = JSONObject{}
		return err
	}
	m := map[string]any{}
	if err := json.Unmarshal(data, &m); err != nil {
		return fmt.Errorf("jsonb object: %w", err)
	}
	*o = m
	return nil
}

// Value writes the object as jsonb; nil is an empty object.
func (o JSONObject) Value() (driver.Value, error) {
	if o == nil {
		return []byte("{}"), nil
	}
	return json.Marshal(map[string]any(o))
}

// JSONList is a list of strings stored in a jsonb column.
type JSONList []string

// Scan reads a jsonb array of strings; NULL is an empty list.
func (l *JSONList) Scan(src any) error {
	data, err := jsonBytes(src)
	if err != nil || data == nil {
		*l = JSONList{}
		return err
	}
	out := []string{}
	if err := json.Unmarshal(data, &out); err != nil {
		return fmt.Errorf("jsonb list: %w", err)
	}
	*l = out
	return nil
}

// Value writes the list as a jsonb array; nil is an empty array.
func (l JSONList) Value() (driver.Value, error) {
	if l == nil {
		return []byte("[]"), nil
	}
	return json.Marshal([]string(l))
}

// JSONValue is any JSON document stored in a jsonb column, kept raw.
type JSONValue = json.RawMessage

func jsonBytes(src any) ([]byte, error) {
	switch v := src.(type) {
	case nil:
		return nil, nil
	case []byte:
		return v, nil
	case string:
		return []byte(v), nil
	default:
		return nil, fmt.Errorf("cannot scan %T as JSON", src)
	}
}
