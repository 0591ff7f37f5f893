//! The XML of S3: a writer with escaping for responses, and a small reader for the two
//! request bodies the gateway accepts (CompleteMultipartUpload and Delete), which are flat
//! lists of elements with text.

/// Escape text for element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Characters XML 1.0 cannot carry literally (S3 keys may hold them).
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n') => {
                out.push_str(&format!("&#x{:X};", c as u32));
            }
            c => out.push(c),
        }
    }
    out
}

/// Builds an S3 response document (`<?xml …?>` and elements in the S3 namespace).
pub struct Writer {
    out: String,
    /// The next element opened is the root and gets the S3 namespace.
    first: bool,
}

impl Default for Writer {
    fn default() -> Self {
        Self::new()
    }
}

impl Writer {
    pub fn new() -> Writer {
        Writer {
            out: String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"),
            first: true,
        }
    }

    /// A document whose root has no namespace: S3's error documents (SDKs do not find
    /// the code of a namespaced `<Error>`).
    pub fn without_namespace() -> Writer {
        Writer {
            first: false,
            ..Writer::new()
        }
    }

    /// Open an element; the first one (the root) carries the S3 namespace.
    pub fn open(&mut self, name: &str) {
        if self.first {
            self.first = false;
            self.out.push_str(&format!(
                "<{name} xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">"
            ));
        } else {
            self.out.push_str(&format!("<{name}>"));
        }
    }

    pub fn close(&mut self, name: &str) {
        self.out.push_str(&format!("</{name}>"));
    }

    /// `<name>text</name>`, escaped.
    pub fn elem(&mut self, name: &str, text: &str) {
        self.out
            .push_str(&format!("<{name}>{}</{name}>", escape(text)));
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// An element of a parsed request body: its name (without namespace prefix), text and
/// children.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    pub text: String,
    pub children: Vec<Element>,
}

impl Element {
    /// The first child named `name`.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Children named `name`.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The text of the first child named `name`.
    pub fn text_of(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.as_str())
    }
}

/// Parse a small XML document into its root element. Handles the declaration, comments,
/// CDATA, namespace prefixes and the five named and numeric character references; rejects
/// documents past 16 MiB or 64 levels deep.
pub fn parse(input: &[u8]) -> Result<Element, String> {
    if input.len() > 16 << 20 {
        return Err("document larger than 16 MiB".into());
    }
    let s = std::str::from_utf8(input).map_err(|_| "not UTF-8".to_string())?;
    let mut p = Parser { s, i: 0 };
    p.skip_prolog()?;
    let root = p.element(0)?;
    p.skip_misc()?;
    if p.i != p.s.len() {
        return Err("content after the root element".into());
    }
    Ok(root)
}

struct Parser<'a> {
    s: &'a str,
    i: usize,
}

impl<'a> Parser<'a> {
    fn rest(&self) -> &'a str {
        &self.s[self.i..]
    }

    fn skip_ws(&mut self) {
        let t = self.rest();
        self.i += t.len() - t.trim_start().len();
    }

    fn skip_until(&mut self, end: &str) -> Result<(), String> {
        match self.rest().find(end) {
            Some(k) => {
                self.i += k + end.len();
                Ok(())
            }
            None => Err(format!("missing {end}")),
        }
    }

    fn skip_misc(&mut self) -> Result<(), String> {
        loop {
            self.skip_ws();
            if self.rest().starts_with("<!--") {
                self.skip_until("-->")?;
            } else if self.rest().starts_with("<?") {
                self.skip_until("?>")?;
            } else {
                return Ok(());
            }
        }
    }

    fn skip_prolog(&mut self) -> Result<(), String> {
        if self.rest().starts_with('\u{feff}') {
            self.i += '\u{feff}'.len_utf8();
        }
        self.skip_misc()?;
        if self.rest().starts_with("<!DOCTYPE") {
            return Err("DOCTYPE is not allowed".into());
        }
        Ok(())
    }

    fn name(&mut self) -> Result<String, String> {
        let t = self.rest();
        let n = t
            .find(|c: char| c.is_whitespace() || c == '>' || c == '/')
            .unwrap_or(t.len());
        if n == 0 {
            return Err("empty element name".into());
        }
        let full = &t[..n];
        self.i += n;
        Ok(full.rsplit(':').next().unwrap_or(full).to_string())
    }

    fn element(&mut self, depth: usize) -> Result<Element, String> {
        if depth > 64 {
            return Err("nested too deeply".into());
        }
        if !self.rest().starts_with('<') {
            return Err("expected an element".into());
        }
        self.i += 1;
        let name = self.name()?;
        // Attributes (namespaces) are skipped; quoted values may contain '>'.
        loop {
            self.skip_ws();
            let t = self.rest();
            if t.starts_with("/>") {
                self.i += 2;
                return Ok(Element {
                    name,
                    ..Default::default()
                });
            }
            if t.starts_with('>') {
                self.i += 1;
                break;
            }
            let eq = t.find('=').ok_or("bad attribute")?;
            self.i += eq + 1;
            self.skip_ws();
            let q = self.rest().chars().next().ok_or("bad attribute")?;
            if q != '"' && q != '\'' {
                return Err("unquoted attribute".into());
            }
            self.i += 1;
            self.skip_until(&q.to_string())?;
        }
        let mut el = Element {
            name,
            ..Default::default()
        };
        loop {
            let t = self.rest();
            if t.is_empty() {
                return Err(format!("unclosed element {}", el.name));
            }
            if t.starts_with("</") {
                self.i += 2;
                let end = self.name()?;
                if end != el.name {
                    return Err(format!("</{end}> closes <{}>", el.name));
                }
                self.skip_ws();
                if !self.rest().starts_with('>') {
                    return Err("bad closing tag".into());
                }
                self.i += 1;
                if !el.children.is_empty() {
                    el.text = el.text.trim().to_string();
                }
                return Ok(el);
            }
            if t.starts_with("<!--") {
                self.skip_until("-->")?;
            } else if let Some(body) = t.strip_prefix("<![CDATA[") {
                let end = body.find("]]>").ok_or("unclosed CDATA")?;
                el.text.push_str(&body[..end]);
                self.i += "<![CDATA[".len() + end + 3;
            } else if t.starts_with("<?") {
                self.skip_until("?>")?;
            } else if t.starts_with('<') {
                let child = self.element(depth + 1)?;
                el.children.push(child);
            } else {
                let n = t.find('<').unwrap_or(t.len());
                el.text.push_str(&unescape(&t[..n])?);
                self.i += n;
            }
        }
    }
}

/// Resolve character references in text.
pub fn unescape(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(k) = rest.find('&') {
        out.push_str(&rest[..k]);
        let after = &rest[k + 1..];
        let end = after.find(';').ok_or("unterminated character reference")?;
        let ent = &after[..end];
        let c = match ent {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let code = if let Some(h) = ent.strip_prefix("#x").or(ent.strip_prefix("#X")) {
                    u32::from_str_radix(h, 16).ok()
                } else if let Some(d) = ent.strip_prefix('#') {
                    d.parse().ok()
                } else {
                    None
                };
                code.and_then(char::from_u32)
                    .ok_or_else(|| format!("unknown character reference &{ent};"))?
            }
        };
        out.push(c);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_quotes_and_control_characters() {
        assert_eq!(escape("a&b<c>d\"e'f"), "a&amp;b&lt;c&gt;d&quot;e&apos;f");
        assert_eq!(escape("x\ry\u{1}z\tq\n"), "x&#xD;y&#x1;z\tq\n");
        assert_eq!(escape("ünï/cødé"), "ünï/cødé");
        for s in ["a&b<c>d\"e'f", "x\ry\u{1}z", "plain"] {
            assert_eq!(unescape(&escape(s)).unwrap(), s);
        }
    }

    #[test]
    fn writer_puts_the_namespace_on_the_root_only() {
        let mut w = Writer::new();
        w.open("ListBucketResult");
        w.elem("Name", "b");
        w.open("Contents");
        w.elem("Key", "a<b");
        w.close("Contents");
        w.close("ListBucketResult");
        assert_eq!(
            w.finish(),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Name>b</Name><Contents><Key>a&lt;b</Key></Contents></ListBucketResult>"
        );
    }

    #[test]
    fn parses_a_complete_multipart_upload_body() {
        let body = br#"<?xml version="1.0" encoding="UTF-8"?>
<CompleteMultipartUpload xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <!-- two parts -->
  <Part><ETag>"abc"</ETag><PartNumber>1</PartNumber></Part>
  <Part>
    <PartNumber>2</PartNumber>
    <ETag>&quot;def&quot;</ETag>
  </Part>
</CompleteMultipartUpload>"#;
        let root = parse(body).unwrap();
        assert_eq!(root.name, "CompleteMultipartUpload");
        let parts: Vec<(String, String)> = root
            .all("Part")
            .map(|p| {
                (
                    p.text_of("PartNumber").unwrap().to_string(),
                    p.text_of("ETag").unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            parts,
            vec![
                ("1".to_string(), "\"abc\"".to_string()),
                ("2".to_string(), "\"def\"".to_string())
            ]
        );
    }

    #[test]
    fn parses_a_delete_body_with_prefixes_cdata_and_references() {
        let body = b"<s3:Delete xmlns:s3='x'><s3:Quiet>true</s3:Quiet><Object><Key>a&amp;b&#x2F;c&#10;</Key></Object><Object><Key><![CDATA[<raw>]]></Key><VersionId/></Object></s3:Delete>";
        let root = parse(body).unwrap();
        assert_eq!(root.text_of("Quiet"), Some("true"));
        let keys: Vec<&str> = root
            .all("Object")
            .map(|o| o.text_of("Key").unwrap())
            .collect();
        assert_eq!(keys, vec!["a&b/c\n", "<raw>"]);
    }

    #[test]
    fn rejects_malformed_documents() {
        for bad in [
            &b"<a><b></a>"[..],
            b"<a>",
            b"<a></a><b></b>",
            b"<!DOCTYPE x><a/>",
            b"<a>&bogus;</a>",
            b"",
            b"text",
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
