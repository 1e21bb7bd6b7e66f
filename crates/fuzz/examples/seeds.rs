//! Writes the seed corpus of the `archive` target (fuzz/corpus/archive): archives made
//! by xdb-file's own writer, with requests after them. The other seeds are written by
//! hand. `cargo run -p jrs-fuzz --example seeds`.

use std::path::Path;

use jrs_fuzz::targets::disk::archive_image;

fn item(id: &str, time: u64, with: &str, body: &str) -> String {
    format!(
        "<item id='{id}' time='{time}' with='{with}'><message xmlns='jabber:client' to='{with}' \
         from='alice@localhost/phone' type='chat' id='{id}'><body>{body}</body></message></item>"
    )
}

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/archive");
    std::fs::create_dir_all(&dir).expect("the corpus directory");
    let first = [
        item("a1", 1_000_000, "bob@example.net/home", "hi"),
        item("a2", 2_000_000, "carol@example.org", "hello"),
        item("a3", 2_000_000, "bob@example.net/work", "again"),
    ]
    .concat();
    let second = [
        item("a4", 3_000_000, "bob@example.net", "&lt;b&gt; &amp; more"),
        item(
            "a5-0f6c2a9e-8b1d-4c37-9a52-3f0e7d6b1c24-with-a-long-tail",
            4_000_000,
            "",
            "long id",
        ),
    ]
    .concat();
    let seeds: [(&str, Vec<u8>); 4] = [
        (
            "three-items.txt",
            archive_image(4, &[first.as_bytes()], b"@@query\n<query with='bob@example.net' max='2'/>\n"),
        ),
        (
            "two-segments-fixed.txt",
            archive_image(
                2,
                &[first.as_bytes(), second.as_bytes()],
                b"@@fix\n@@query\n<query after-id='a2' max='10'/>\n@@trim\nmax-items=2\n@@reopen\n@@query\n<query from-end='true' max='1'/>\n",
            ),
        ),
        (
            "append-retract.txt",
            archive_image(
                4,
                &[first.as_bytes()],
                format!(
                    "@@append\n{}\n@@retract\n<item id='a2'><message xmlns='jabber:client'><retracted/></message></item>\n@@reopen\n@@query\n<query><id>a2</id><id>a6</id></query>\n",
                    item("a6", 5_000_000, "dave@example.com", "new")
                )
                .as_bytes(),
            ),
        ),
        (
            "empty-then-append.txt",
            format!(
                "@@append\n{}\n@@query\n<query start='0' end='9999999999' max='5'/>\n@@delete\n",
                item("b1", 7, "erin@example.com", "x")
            )
            .into_bytes(),
        ),
    ];
    for (name, data) in seeds {
        std::fs::write(dir.join(name), data).expect("writing a seed");
    }
}
